//! The cache service against real Redis: every operation, a stopped Redis, an undecodable
//! value, 100 concurrent misses, and a pattern delete over 50,000 keys.

use crate::common;

use arnela::cache::{keys, Cache, Ttl};
use common::process::{free_port, redis_server};
use common::{eventually, redis, unique_prefix};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[tokio::test]
async fn set_get_exists_and_delete() {
    let cache = Cache::new(redis().await, &unique_prefix());
    let key = keys::client("7");
    assert_eq!(cache.get::<String>(&key).await.unwrap(), None);
    cache
        .set(&key, &"Ana".to_owned(), Ttl::Short)
        .await
        .unwrap();
    assert_eq!(
        cache.get::<String>(&key).await.unwrap().as_deref(),
        Some("Ana")
    );
    assert!(cache.exists(&key).await.unwrap());
    assert!(cache.delete(&key).await.unwrap());
    assert!(!cache.exists(&key).await.unwrap());
    assert!(!cache.delete(&key).await.unwrap());
}

#[tokio::test]
async fn a_set_carries_its_tier_ttl_with_a_little_jitter() {
    let prefix = unique_prefix();
    let cache = Cache::new(redis().await, &prefix);
    let mut c = redis().await;
    let mut ttls = Vec::new();
    for i in 0..20 {
        cache
            .set(&format!("stats:dashboard:{i}"), &1, Ttl::Medium)
            .await
            .unwrap();
        let pttl: i64 = redis::cmd("PTTL")
            .arg(format!("{prefix}:cache:stats:dashboard:{i}"))
            .query_async(&mut c)
            .await
            .unwrap();
        ttls.push(pttl);
    }
    // each within the tier and its 5% of jitter ...
    for pttl in &ttls {
        assert!(
            (15 * 60_000 - 5_000..=15 * 60_000 * 105 / 100).contains(pttl),
            "{ttls:?}"
        );
    }
    // ... and spread over it: keys set together do not expire together (the jitter draws from
    // 45 s; without it the 20 TTLs would lie within the few milliseconds the sets took)
    let spread = ttls.iter().max().unwrap() - ttls.iter().min().unwrap();
    assert!(spread > 5_000, "{ttls:?}");
}

#[tokio::test]
async fn get_or_set_loads_once_and_then_hits() {
    let cache = Cache::new(redis().await, &unique_prefix());
    let calls = AtomicUsize::new(0);
    for _ in 0..3 {
        let v: Result<Vec<u32>, ()> = cache
            .get_or_set("clients:list", Ttl::Short, || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok(vec![1, 2, 3])
            })
            .await;
        assert_eq!(v.unwrap(), [1, 2, 3]);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(cache.stats.hits.load(Ordering::Relaxed), 2);
    assert_eq!(cache.stats.misses.load(Ordering::Relaxed), 1);
    // a loader error is the caller's error, and nothing is cached
    let failed: Result<u32, &str> = cache
        .get_or_set("client:x", Ttl::Short, || async { Err("db down") })
        .await;
    assert_eq!(failed, Err("db down"));
    assert!(!cache.exists("client:x").await.unwrap());
}

#[tokio::test]
async fn an_undecodable_value_is_replaced() {
    let prefix = unique_prefix();
    let cache = Cache::new(redis().await, &prefix);
    let mut c = redis().await;
    let _: () = redis::cmd("SET")
        .arg(format!("{prefix}:cache:employee:1"))
        .arg("{not json")
        .query_async(&mut c)
        .await
        .unwrap();
    let v: Result<String, ()> = cache
        .get_or_set("employee:1", Ttl::Long, || async { Ok("Eva".to_owned()) })
        .await;
    assert_eq!(v.unwrap(), "Eva");
    assert_eq!(
        cache.get::<String>("employee:1").await.unwrap().as_deref(),
        Some("Eva")
    );
    assert_eq!(cache.stats.errors.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn a_hundred_concurrent_misses_call_the_loader_once() {
    let cache = Cache::new(redis().await, &unique_prefix());
    let calls = Arc::new(AtomicUsize::new(0));
    let reads = (0..100).map(|_| {
        let (cache, calls) = (cache.clone(), calls.clone());
        async move {
            cache
                .get_or_set("appointment:42", Ttl::Short, || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok::<_, ()>("10:00".to_owned())
                })
                .await
                .unwrap()
        }
    });
    let values = futures::future::join_all(reads).await;
    assert!(values.iter().all(|v| v == "10:00"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn two_processes_missing_together_load_once() {
    // two caches on separate connections stand in for two processes
    let prefix = unique_prefix();
    let (a, b) = (
        Cache::new(redis().await, &prefix),
        Cache::new(redis().await, &prefix),
    );
    let calls = Arc::new(AtomicUsize::new(0));
    let load = |calls: Arc<AtomicUsize>| {
        move || async move {
            calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(200)).await;
            Ok::<_, ()>(5u32)
        }
    };
    let (x, y) = tokio::join!(
        a.get_or_set("stats:dashboard", Ttl::Short, load(calls.clone())),
        b.get_or_set("stats:dashboard", Ttl::Short, load(calls.clone()))
    );
    assert_eq!((x.unwrap(), y.unwrap()), (5, 5));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_stopped_redis_never_fails_a_read() {
    let port = free_port();
    let mut server = redis_server(port);
    let url = format!("redis://127.0.0.1:{port}");
    // the service's own connection settings (bounded reconnects and timeouts)
    let conn = eventually(Duration::from_secs(10), "own redis", || {
        let info = redis::IntoConnectionInfo::into_connection_info(url.as_str()).unwrap();
        async move { arnela::queue::connect(info).await.ok() }
    })
    .await;
    let cache = Cache::new(conn, "t");
    server.kill9();
    let v: Result<u32, ()> = cache
        .get_or_set("client:1", Ttl::Short, || async { Ok(11) })
        .await;
    assert_eq!(v.unwrap(), 11);
    assert!(cache.stats.errors.load(Ordering::Relaxed) >= 1);
    assert!(
        cache.get::<u32>("client:1").await.is_err(),
        "explicit operations report the error"
    );
}

#[tokio::test]
async fn a_pattern_delete_over_fifty_thousand_keys_leaves_the_others() {
    let prefix = unique_prefix();
    let cache = Cache::new(redis().await, &prefix);
    let mut c = redis().await;
    for chunk in (0..50_000).collect::<Vec<u32>>().chunks(5000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            pipe.cmd("SET")
                .arg(format!("{prefix}:cache:client:{i}"))
                .arg(1)
                .ignore();
        }
        for i in chunk.iter().take(10) {
            pipe.cmd("SET")
                .arg(format!("{prefix}:cache:employee:{i}"))
                .arg(1)
                .ignore();
        }
        pipe.query_async::<()>(&mut c).await.unwrap();
    }
    assert_eq!(cache.delete_pattern("client:*").await.unwrap(), 50_000);
    assert!(!cache.exists("client:49999").await.unwrap());
    assert!(cache.exists("employee:3").await.unwrap());
    assert_eq!(cache.delete_pattern("employee:*").await.unwrap(), 100);
}

#[tokio::test]
async fn failed_and_finished_loads_leave_no_flight_behind() {
    let cache = Cache::new(redis().await, &unique_prefix());
    let reads = (0..100).map(|i| {
        let cache = cache.clone();
        async move {
            cache
                .get_or_set(&format!("client:{i}"), Ttl::Short, || async move {
                    if i % 2 == 0 {
                        Err("not found")
                    } else {
                        Ok(i)
                    }
                })
                .await
        }
    });
    let results = futures::future::join_all(reads).await;
    assert_eq!(results.iter().filter(|r| r.is_err()).count(), 50);
    assert_eq!(cache.loads_in_flight(), 0);
}

/// Whether the key's generation exists in Redis.
async fn has_generation(prefix: &str, key: &str) -> bool {
    let generation = format!(
        "{}{key}",
        arnela::queue::Keys::new(prefix).cache_generation_prefix()
    );
    let n: i64 = redis::cmd("EXISTS")
        .arg(generation)
        .query_async(&mut redis().await)
        .await
        .unwrap();
    n == 1
}

#[tokio::test]
async fn a_load_overtaken_by_an_invalidation_is_not_cached() {
    let prefix = unique_prefix();
    let cache = Cache::new(redis().await, &prefix);
    let key = keys::client("9");
    // the loader reads the old row, then the write commits and its invalidation runs
    let old: Result<String, ()> = cache
        .get_or_set(&key, Ttl::Short, || async {
            assert!(
                has_generation(&prefix, &key).await,
                "a load has a generation"
            );
            cache.delete(&key).await.unwrap();
            Ok("old".to_owned())
        })
        .await;
    assert_eq!(old.as_deref(), Ok("old"), "the caller gets what it loaded");
    assert!(!cache.exists(&key).await.unwrap(), "but it is not cached");
    // the next load starts after the invalidation: its value is cached
    let new: Result<String, ()> = cache
        .get_or_set(&key, Ttl::Short, || async { Ok("new".to_owned()) })
        .await;
    assert_eq!(new.as_deref(), Ok("new"));
    assert_eq!(
        cache.get::<String>(&key).await.unwrap().as_deref(),
        Some("new")
    );
    // an invalidation takes the value and its generation
    assert!(cache.delete(&key).await.unwrap());
    assert!(!has_generation(&prefix, &key).await);
}

#[tokio::test]
async fn invalidating_keys_nobody_read_leaves_nothing_in_redis() {
    let prefix = unique_prefix();
    let cache = Cache::new(redis().await, &prefix);
    let task_keys: Vec<String> = (0..1200)
        .map(|_| keys::task(uuid::Uuid::new_v4()))
        .collect();
    // one key of each 500-key round trip was read (a value and a generation), the rest not
    let read = [0, 599, 1199];
    for &i in &read {
        let v: Result<String, ()> = cache
            .get_or_set(&task_keys[i], Ttl::Short, || async { Ok("v".to_owned()) })
            .await;
        assert_eq!(v.as_deref(), Ok("v"));
        assert!(has_generation(&prefix, &task_keys[i]).await);
    }
    assert_eq!(
        cache.delete_keys(&task_keys).await.unwrap(),
        read.len() as u64
    );
    for key in read
        .iter()
        .map(|&i| &task_keys[i])
        .chain([&task_keys[1], &task_keys[1000]])
    {
        assert!(!cache.exists(key).await.unwrap(), "{key}");
        assert!(!has_generation(&prefix, key).await, "{key}");
    }
}
