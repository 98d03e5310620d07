//! A small blocking client of the control API, for the CLI, the demo and the tests.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;

use super::ApiError;

/// The daemon did not answer at all (as opposed to answering with an error).
#[derive(Debug, thiserror::Error)]
#[error("the lifeboat daemon is not reachable at {0} ({1})")]
pub struct Unreachable(pub String, pub String);

pub struct Client {
    base: String,
    agent: ureq::Agent,
    /// `Bearer TOKEN`, when the daemon asks for one.
    authorization: Option<String>,
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
            authorization: None,
        }
    }

    /// Sends `token` as a bearer token with every request.
    pub fn with_token(mut self, token: Option<String>) -> Client {
        self.authorization = token.map(|t| format!("Bearer {t}"));
        self
    }

    fn auth<B>(&self, req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.authorization {
            Some(a) => req.header("Authorization", a),
            None => req,
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
        let req = self.auth(self.agent.get(&format!("{}{path}", self.base)));
        self.decode(path, req.call())
    }

    pub fn post<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let req = self.auth(self.agent.post(&format!("{}{path}", self.base)));
        self.decode(path, req.send_empty())
    }

    pub fn get_text(&self, path: &str) -> Result<String> {
        let mut resp = self
            .auth(self.agent.get(&format!("{}{path}", self.base)))
            .call()
            .map_err(|e| Unreachable(self.base.clone(), e.to_string()))?;
        Ok(resp.body_mut().read_to_string()?)
    }
}
