//! Optional client authentication at the front: an htpasswd file of bcrypt
//! entries, as registry:2 takes it (`REGISTRY_AUTH_HTPASSWD_PATH`,
//! `REGISTRY_AUTH_HTPASSWD_REALM`).
//!
//! bcrypt is slow on purpose (tens of ms per check), so a successful check is
//! remembered for a short while, keyed by a SHA-256 of the credentials: the
//! password itself is never stored or logged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::HeaderValue;
use sha2::{Digest as _, Sha256};

/// How long a verified (user, password) pair skips bcrypt.
const REMEMBER: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("REGISTRY_AUTH_HTPASSWD_PATH {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "REGISTRY_AUTH_HTPASSWD_PATH {path} holds no bcrypt entry (create them with `htpasswd -B`)"
    )]
    Empty { path: String },
}

/// The users allowed in, and the realm they are told about.
pub struct Htpasswd {
    realm: String,
    users: HashMap<String, String>,
    verified: Mutex<HashMap<[u8; 32], Instant>>,
}

/// The outcome of checking a request.
pub enum Check {
    /// Right credentials, of this user.
    Allowed(String),
    /// No or malformed credentials: ask for them.
    Missing,
    /// Wrong user or password (the user name, for the log).
    Refused(String),
}

impl Htpasswd {
    /// Loads `path`; lines that are not `user:$2[aby]$...` are skipped with a warning.
    pub fn load(path: &str, realm: Option<String>) -> Result<Htpasswd, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_string(),
            source,
        })?;
        let mut users = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match line.split_once(':') {
                Some((user, hash)) if hash.starts_with("$2") => {
                    users.insert(user.to_string(), hash.to_string());
                }
                _ => tracing::warn!(path, line = n + 1, "htpasswd entry is not bcrypt; ignored"),
            }
        }
        if users.is_empty() {
            return Err(Error::Empty {
                path: path.to_string(),
            });
        }
        Ok(Htpasswd {
            realm: realm.unwrap_or_else(|| "regcache".to_string()),
            users,
            verified: Mutex::new(HashMap::new()),
        })
    }

    /// Checks a request's `Authorization` header.
    pub async fn check(self: &Arc<Self>, authorization: Option<&HeaderValue>) -> Check {
        // Clients without credentials answer a Basic challenge with an empty
        // pair (containers/image does): that is no credentials at all.
        let Some((user, password)) = authorization
            .and_then(parse_basic)
            .filter(|(u, p)| !(u.is_empty() && p.is_empty()))
        else {
            return Check::Missing;
        };
        let key: [u8; 32] = Sha256::new()
            .chain_update(user.as_bytes())
            .chain_update([0])
            .chain_update(password.as_bytes())
            .finalize()
            .into();
        if let Some(at) = self.verified.lock().unwrap().get(&key) {
            if at.elapsed() < REMEMBER {
                return Check::Allowed(user);
            }
        }
        let Some(hash) = self.users.get(&user).cloned() else {
            return Check::Refused(user);
        };
        let ok =
            tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
                .await
                .unwrap_or(false);
        if ok {
            let mut v = self.verified.lock().unwrap();
            v.retain(|_, at| at.elapsed() < REMEMBER);
            v.insert(key, Instant::now());
            Check::Allowed(user)
        } else {
            Check::Refused(user)
        }
    }

    /// The realm clients are told to log in to.
    pub fn realm(&self) -> &str {
        &self.realm
    }
}

/// `Basic base64(user:password)` -> (user, password).
pub(crate) fn parse_basic(v: &HeaderValue) -> Option<(String, String)> {
    let v = v.to_str().ok()?;
    let (scheme, b64) = v.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(contents: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), contents).unwrap();
        f
    }

    #[tokio::test]
    async fn bcrypt_entries_only() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let f = file(&format!("# users\nalice:{hash}\nbob:{{SHA}}xyz\n"));
        let h = Arc::new(Htpasswd::load(f.path().to_str().unwrap(), None).unwrap());
        let basic = |u: &str, p: &str| {
            use base64::Engine as _;
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
            HeaderValue::from_str(&format!("Basic {token}")).unwrap()
        };
        assert!(matches!(
            h.check(Some(&basic("alice", "s3cret"))).await,
            Check::Allowed(_)
        ));
        // Remembered: same answer without bcrypt.
        assert!(matches!(
            h.check(Some(&basic("alice", "s3cret"))).await,
            Check::Allowed(_)
        ));
        assert!(
            matches!(h.check(Some(&basic("alice", "wrong"))).await, Check::Refused(u) if u == "alice")
        );
        assert!(matches!(
            h.check(Some(&basic("bob", "xyz"))).await,
            Check::Refused(_)
        ));
        assert!(matches!(h.check(None).await, Check::Missing));
        assert!(matches!(
            h.check(Some(&HeaderValue::from_static("Bearer x"))).await,
            Check::Missing
        ));
        assert_eq!(h.realm(), "regcache");
    }

    #[test]
    fn refuses_files_without_bcrypt() {
        let f = file("bob:{SHA}xyz\n");
        assert!(matches!(
            Htpasswd::load(f.path().to_str().unwrap(), None),
            Err(Error::Empty { .. })
        ));
    }
}
