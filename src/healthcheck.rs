//! A tiny HTTP GET for container health checks, so the runtime image needs no curl.

use anyhow::{bail, Context};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// GETs `url` (plain `http://host:port/path`) and succeeds on a 2xx status.
pub async fn check(url: &str) -> anyhow::Result<()> {
    let rest = url
        .strip_prefix("http://")
        .context("only http:// URLs are supported")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let io = async {
        let mut stream = TcpStream::connect(authority).await?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut head = vec![0u8; 64];
        let n = stream.read(&mut head).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&head[..n]).into_owned())
    };
    let head = tokio::time::timeout(Duration::from_secs(3), io)
        .await
        .context("timed out")?
        .with_context(|| format!("cannot reach {authority}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .context("not an HTTP response")?;
    if !(200..300).contains(&status) {
        bail!("{url} answered {status}");
    }
    Ok(())
}
