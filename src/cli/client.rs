//! A small client of the control API (HTTP and JSON), used by the commands, the demo, the
//! integration tests and the benchmarks. `Client::new`, which picks the site from the
//! command line's `--config` or `--control`, is in `commands.rs`.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;

use crate::site::control::ApiError;

#[derive(Debug, thiserror::Error)]
#[error("the lifeboat daemon is not reachable at {0} ({1})")]
pub(super) struct Unreachable(String, String);

/// A small client of the control API.
pub struct Client {
    base: String,
    agent: ureq::Agent,
}

impl Client {
    pub fn at(addr: &str) -> Client {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            .build()
            .into();
        Client {
            base: format!("http://{addr}"),
            agent,
        }
    }

    fn decode<T: DeserializeOwned>(
        &self,
        path: &str,
        r: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<T> {
        let mut resp = r.map_err(|e| Unreachable(self.base.clone(), e.to_string()))?;
        let status = resp.status();
        let body = resp
            .body_mut()
            .read_to_string()
            .with_context(|| format!("read the answer to {path}"))?;
        if status.is_success() {
            serde_json::from_str(&body).with_context(|| format!("decode the answer to {path}"))
        } else {
            match serde_json::from_str::<ApiError>(&body) {
                Ok(e) => bail!("{}", e.error),
                Err(_) => bail!("{path}: HTTP {status}: {body}"),
            }
        }
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.decode(path, self.agent.get(&format!("{}{path}", self.base)).call())
    }

    pub fn post<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.decode(
            path,
            self.agent
                .post(&format!("{}{path}", self.base))
                .send_empty(),
        )
    }

    pub fn get_text(&self, path: &str) -> Result<String> {
        let mut resp = self
            .agent
            .get(&format!("{}{path}", self.base))
            .call()
            .map_err(|e| Unreachable(self.base.clone(), e.to_string()))?;
        Ok(resp.body_mut().read_to_string()?)
    }
}
