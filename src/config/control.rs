//! Validation of `[control]`: its address and the callers allowed to use it. An address
//! other than loopback needs at least one `[[control.client]]`: the API can fail over a
//! protection and read every mirrored Secret.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;

use super::raw::RawControl;
use super::validate::Validator;
use super::ControlClient;
use crate::api::Level;

/// Shorter tokens are refused: a token is a password that nobody types.
pub const MIN_TOKEN_LEN: usize = 16;

impl Validator {
    pub(super) fn control(&mut self, raw: Option<&RawControl>) -> (SocketAddr, Vec<ControlClient>) {
        let Some(raw) = raw else {
            return (SocketAddr::from(([127, 0, 0, 1], 7421)), Vec::new());
        };
        let address = self.addr("control.address", &raw.address);
        let mut clients: Vec<ControlClient> = Vec::new();
        let mut tokens: HashMap<String, String> = HashMap::new();
        for (i, c) in raw.clients.iter().enumerate() {
            let key = format!("control.client[{i}]");
            if c.name.trim().is_empty() || c.name.chars().any(|ch| ch.is_control()) {
                self.problem(
                    format!("{key}.name"),
                    format!("{:?} is not a name; expected who this caller is, such as \"oncall\" or \"prometheus\"", c.name),
                );
            } else if let Some(j) = clients.iter().position(|o| o.name == c.name) {
                self.problem(
                    format!("{key}.name"),
                    format!("{:?} is also the name of control.client[{j}]; each caller needs its own name", c.name),
                );
            }
            let level = Level::parse(&c.level).unwrap_or_else(|| {
                self.problem(
                    format!("{key}.level"),
                    format!(
                        "{:?} is not a level; expected \"read\" (metrics, status), \"operate\" (also sync) or \"admin\" (also failover, quiesce, reprotect, Secrets)",
                        c.level
                    ),
                );
                Level::Read
            });
            let token_file = self.path(&format!("{key}.token_file"), &c.token_file);
            if self.check_files {
                match token_problem(&token_file) {
                    Err(message) => self.problem(format!("{key}.token_file"), message),
                    Ok(token) => {
                        if let Some(other) = tokens.insert(token, key.clone()) {
                            self.problem(
                                format!("{key}.token_file"),
                                format!("holds the same token as {other}.token_file; each caller needs its own token, or the log cannot say who called"),
                            );
                        }
                    }
                }
            }
            clients.push(ControlClient {
                name: c.name.clone(),
                level,
                token_file,
            });
        }
        if clients.is_empty() && !address.ip().is_loopback() {
            self.problem(
                "control.address",
                format!(
                    "{address} is not a loopback address and no [[control.client]] is configured: anyone who reaches it could fail over, scale workloads to zero or read Secrets; add a [[control.client]] with a token_file (see the README's \"Control API\"), or bind to 127.0.0.1"
                ),
            );
        }
        (address, clients)
    }
}

/// The token in `path`, or why it cannot be one.
fn token_problem(path: &Path) -> Result<String, String> {
    if let Some(loose) = crate::net::tls::loose_key(path) {
        return Err(loose);
    }
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "cannot read {}: {e}; expected a file holding a bearer token",
            path.display()
        )
    })?;
    let token = text.trim();
    if token.len() < MIN_TOKEN_LEN || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{} does not hold a token; expected one line of at least {MIN_TOKEN_LEN} characters without spaces (for example: head -c 32 /dev/urandom | base64 > FILE)",
            path.display()
        ));
    }
    Ok(token.to_string())
}

/// The token in `path` for a client to send, checked as the daemon checks it.
pub fn read_token(path: &Path) -> Result<String, String> {
    token_problem(path)
}
