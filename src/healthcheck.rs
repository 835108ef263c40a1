//! A tiny HTTP GET for container health checks, so the runtime image needs no curl.

use anyhow::{bail, Context};
use std::time::Duration;

/// GETs `url` and succeeds on a 2xx status, within 3 s.
pub async fn check(url: &str) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .context("cannot build an HTTP client")?;
    let response = client
        .get(url)
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let status = response.status();
    if !status.is_success() {
        bail!("{url} answered {}", status.as_u16());
    }
    Ok(())
}
