//! Upstream authentication: challenges, credentials and the token cache.
//!
//! A registry says how it wants to be spoken to in `WWW-Authenticate`:
//! `Bearer realm=..,service=..,scope=..` (fetch a token from the realm,
//! anonymously or with our credentials) or `Basic` (send credentials on every
//! request). What a host asked for is remembered, so later requests carry a
//! token up front instead of paying a 401 round trip each time.
//!
//! SECURITY: credentials and tokens print as `<redacted>`; nothing here logs
//! a header value.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Tokens are dropped this long before the server says they expire.
const EXPIRY_MARGIN: Duration = Duration::from_secs(10);
/// Tokens (and their locks) kept before expired ones are dropped.
const KEYS_BEFORE_PRUNING: usize = 256;
/// Lifetime assumed when the token response carries no `expires_in`.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

/// A string that never shows up in logs or `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// This upstream's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: Secret,
}

impl Credentials {
    /// `Authorization: Basic ...` for these credentials.
    pub fn basic_header(&self) -> String {
        basic_header(&self.username, self.password.expose())
    }
}

pub fn basic_header(user: &str, password: &str) -> String {
    use base64::Engine as _;
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {token}")
}

/// One parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    Basic,
}

/// Parses every challenge in the given header values; Bearer ones first.
pub fn parse_challenges<'a>(values: impl IntoIterator<Item = &'a str>) -> Vec<Challenge> {
    let mut out = Vec::new();
    for v in values {
        for (scheme, params) in split_challenges(v) {
            let get = |k: &str| {
                params
                    .iter()
                    .find(|(pk, _)| pk.eq_ignore_ascii_case(k))
                    .map(|(_, v)| v.clone())
            };
            if scheme.eq_ignore_ascii_case("bearer") {
                if let Some(realm) = get("realm") {
                    out.push(Challenge::Bearer {
                        realm,
                        service: get("service"),
                        scope: get("scope"),
                    });
                }
            } else if scheme.eq_ignore_ascii_case("basic") {
                out.push(Challenge::Basic);
            }
        }
    }
    out.sort_by_key(|c| matches!(c, Challenge::Basic));
    out
}

/// Splits one header value into (scheme, [(key, value)]) challenges. Params
/// are `key=token` or `key="quoted"`, comma-separated; a bare token starts the
/// next challenge.
fn split_challenges(v: &str) -> Vec<(String, Vec<(String, String)>)> {
    let mut out: Vec<(String, Vec<(String, String)>)> = Vec::new();
    let b = v.as_bytes();
    let mut i = 0;
    let skip = |i: &mut usize, set: &[u8]| {
        while *i < b.len() && set.contains(&b[*i]) {
            *i += 1;
        }
    };
    loop {
        skip(&mut i, b" \t,");
        if i >= b.len() {
            break;
        }
        let start = i;
        while i < b.len() && !b" \t,=".contains(&b[i]) {
            i += 1;
        }
        let token = v[start..i].to_string();
        skip(&mut i, b" \t");
        if i < b.len() && b[i] == b'=' {
            i += 1;
            skip(&mut i, b" \t");
            let value = if i < b.len() && b[i] == b'"' {
                i += 1;
                let mut s = String::new();
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' && i + 1 < b.len() {
                        i += 1;
                    }
                    let ch_len = v[i..].chars().next().map_or(1, char::len_utf8);
                    s.push_str(&v[i..i + ch_len]);
                    i += ch_len;
                }
                i += 1;
                s
            } else {
                let s = i;
                while i < b.len() && !b" \t,".contains(&b[i]) {
                    i += 1;
                }
                v[s..i].to_string()
            };
            if let Some(last) = out.last_mut() {
                last.1.push((token, value));
            }
        } else {
            out.push((token, Vec::new()));
        }
    }
    out
}

/// What a host asked for, remembered so the next request goes authorised.
#[derive(Debug, Clone)]
pub enum HostAuth {
    Bearer {
        realm: String,
        service: Option<String>,
    },
    Basic,
}

/// A bearer token and when to stop using it.
#[derive(Clone)]
struct Token {
    value: Secret,
    valid_until: Instant,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TokenKey {
    realm: String,
    service: Option<String>,
    scope: String,
    /// Asked for with this upstream's credentials (else anonymously).
    authenticated: bool,
}

/// Per-upstream authentication state: the credentials, what each host asked
/// for, and the tokens obtained.
pub struct Auth {
    credentials: Option<Credentials>,
    hosts: Mutex<HashMap<String, HostAuth>>,
    /// (host, our scope) -> the scope that host's challenge named instead.
    scopes: Mutex<HashMap<(String, String), String>>,
    tokens: Mutex<HashMap<TokenKey, Token>>,
    /// One lock per token key: concurrent misses for one scope make one
    /// token request, while other scopes go ahead.
    fetching: Mutex<HashMap<TokenKey, Arc<tokio::sync::Mutex<()>>>>,
    metrics: Arc<crate::metrics::Metrics>,
}

/// The token endpoint's answer.
#[derive(serde::Deserialize)]
pub(crate) struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token request to {realm} failed: {source}")]
    Request {
        realm: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("token server {realm} answered {status}")]
    Status {
        realm: String,
        status: reqwest::StatusCode,
    },
    #[error("challenge names an invalid token realm {realm:?}")]
    BadRealm { realm: String },
    #[error("token server {realm} answered without a token")]
    NoToken { realm: String },
}

impl Auth {
    pub fn new(credentials: Option<Credentials>, metrics: Arc<crate::metrics::Metrics>) -> Self {
        Auth {
            credentials,
            hosts: Mutex::new(HashMap::new()),
            scopes: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
            fetching: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// The `Authorization` value to send to `host` up front, if we know one.
    pub fn header_for(&self, host: &str, scope: &str, own_host: bool) -> Option<String> {
        let hosts = self.hosts.lock().unwrap();
        match hosts.get(host)? {
            HostAuth::Basic if own_host => self.credentials.as_ref().map(Credentials::basic_header),
            HostAuth::Basic => None,
            HostAuth::Bearer { realm, service } => {
                // A host may name its own scope for our repository (a
                // redirect hop mirroring it under another path).
                let scopes = self.scopes.lock().unwrap();
                let scope = scopes
                    .get(&(host.to_owned(), scope.to_owned()))
                    .map_or(scope, String::as_str);
                let key = TokenKey {
                    realm: realm.clone(),
                    service: service.clone(),
                    scope: scope.to_owned(),
                    authenticated: own_host && self.credentials.is_some(),
                };
                let tokens = self.tokens.lock().unwrap();
                let t = tokens.get(&key)?;
                (t.valid_until > Instant::now()).then(|| format!("Bearer {}", t.value.expose()))
            }
        }
    }

    /// Learns from a 401's challenges and returns the header to retry with,
    /// or `None` when there is nothing we can answer with. `stale` is the
    /// header that was just refused: its token is dropped, never reused.
    ///
    /// SECURITY: credentials go only to the upstream's own host and the token
    /// realm it names; a host reached by redirect gets anonymous tokens.
    pub async fn answer(
        &self,
        http: &reqwest::Client,
        host: &str,
        own_host: bool,
        challenges: &[Challenge],
        default_scope: &str,
        stale: Option<&str>,
    ) -> Result<Option<String>, TokenError> {
        let Some(challenge) = challenges.first() else {
            return Ok(None);
        };
        let credentials = self.credentials.as_ref().filter(|_| own_host);
        match challenge {
            Challenge::Basic => {
                self.remember(host, HostAuth::Basic);
                let header = credentials.map(Credentials::basic_header);
                // Re-sending refused credentials cannot help.
                Ok(header.filter(|h| Some(h.as_str()) != stale))
            }
            Challenge::Bearer {
                realm,
                service,
                scope,
            } => {
                self.remember(
                    host,
                    HostAuth::Bearer {
                        realm: realm.clone(),
                        service: service.clone(),
                    },
                );
                let scope = scope.clone().unwrap_or_else(|| default_scope.to_owned());
                if scope != default_scope {
                    self.scopes
                        .lock()
                        .unwrap()
                        .insert((host.to_owned(), default_scope.to_owned()), scope.clone());
                }
                let key = TokenKey {
                    realm: realm.clone(),
                    service: service.clone(),
                    scope,
                    authenticated: credentials.is_some(),
                };
                let token = self.token(http, key, stale).await?;
                Ok(Some(format!("Bearer {}", token.expose())))
            }
        }
    }

    fn remember(&self, host: &str, how: HostAuth) {
        self.hosts.lock().unwrap().insert(host.to_owned(), how);
    }

    async fn token(
        &self,
        http: &reqwest::Client,
        key: TokenKey,
        stale: Option<&str>,
    ) -> Result<Secret, TokenError> {
        let lock = {
            let mut fetching = self.fetching.lock().unwrap();
            if fetching.len() > KEYS_BEFORE_PRUNING {
                fetching.retain(|_, l| Arc::strong_count(l) > 1);
            }
            fetching.entry(key.clone()).or_default().clone()
        };
        let _one_per_scope = lock.lock().await;
        // Whoever waited here may find the token its predecessor fetched.
        if let Some(t) = self.tokens.lock().unwrap().get(&key) {
            let refused =
                stale.is_some_and(|s| s.strip_prefix("Bearer ") == Some(t.value.expose()));
            if t.valid_until > Instant::now() && !refused {
                return Ok(t.value.clone());
            }
        }
        let result = self.fetch_token(http, key).await;
        self.metrics.token(result.is_ok());
        result
    }

    async fn fetch_token(
        &self,
        http: &reqwest::Client,
        key: TokenKey,
    ) -> Result<Secret, TokenError> {
        let mut url = reqwest::Url::parse(&key.realm).map_err(|_| TokenError::BadRealm {
            realm: key.realm.clone(),
        })?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = &key.service {
                q.append_pair("service", s);
            }
            if !key.scope.is_empty() {
                q.append_pair("scope", &key.scope);
            }
        }
        let mut req = http.get(url);
        if let Some(c) = self.credentials.as_ref().filter(|_| key.authenticated) {
            req = req.header(reqwest::header::AUTHORIZATION, c.basic_header());
        }
        let realm = key.realm.clone();
        let resp = req.send().await.map_err(|e| TokenError::Request {
            realm: realm.clone(),
            source: e.without_url(),
        })?;
        if !resp.status().is_success() {
            return Err(TokenError::Status {
                realm,
                status: resp.status(),
            });
        }
        let body = resp.bytes().await.map_err(|e| TokenError::Request {
            realm: realm.clone(),
            source: e.without_url(),
        })?;
        let parsed: TokenResponse =
            serde_json::from_slice(&body).map_err(|_| TokenError::NoToken {
                realm: realm.clone(),
            })?;
        let value = parsed
            .token
            .or(parsed.access_token)
            .filter(|t| !t.is_empty())
            .ok_or(TokenError::NoToken { realm })?;
        let lifetime = parsed
            .expires_in
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_TOKEN_LIFETIME);
        let valid_until = Instant::now() + lifetime.saturating_sub(EXPIRY_MARGIN);
        let value = Secret::new(value);
        let mut tokens = self.tokens.lock().unwrap();
        if tokens.len() > KEYS_BEFORE_PRUNING {
            let now = Instant::now();
            tokens.retain(|_, t| t.valid_until > now);
        }
        tokens.insert(
            key,
            Token {
                value: value.clone(),
                valid_until,
            },
        );
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_hub_challenge() {
        let c = parse_challenges([
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/debian:pull""#,
        ]);
        assert_eq!(
            c,
            vec![Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/debian:pull".into()),
            }]
        );
    }

    #[test]
    fn bearer_preferred_and_service_optional() {
        let c = parse_challenges([
            r#"Basic realm="Gitea Package API""#,
            r#"Bearer realm="https://codeberg.org/v2/token""#,
        ]);
        assert_eq!(
            c,
            vec![
                Challenge::Bearer {
                    realm: "https://codeberg.org/v2/token".into(),
                    service: None,
                    scope: None
                },
                Challenge::Basic
            ]
        );
        let c = parse_challenges([
            r#"Basic realm="x", Bearer realm=https://a/t,scope="repository:h:5000/a:pull""#,
        ]);
        assert_eq!(c.len(), 2);
        assert!(
            matches!(&c[0], Challenge::Bearer { scope: Some(s), .. } if s == "repository:h:5000/a:pull")
        );
    }

    #[test]
    fn basic_headers() {
        assert_eq!(basic_header("user", "pass"), "Basic dXNlcjpwYXNz");
    }

    /// A slow token request for one scope holds back no other scope.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn token_requests_for_other_scopes_do_not_wait_for_each_other() {
        use regcache_testkit::fake::{FakeRegistry, Gate, Reply, Serve};
        let fake = FakeRegistry::start();
        let gate = Gate::new();
        let held = gate.clone();
        fake.intercept(move |r| {
            let q = r.query.clone().unwrap_or_default();
            let reply = Reply::json(200, &serde_json::json!({"token": "t"}));
            if q.contains("slow") {
                Some(reply.serve(Serve::ok().pause_at(0, &held)))
            } else {
                Some(reply)
            }
        });
        let auth = Arc::new(Auth::new(None, Arc::new(crate::metrics::Metrics::new("x"))));
        crate::upstream::init_tls();
        let http = reqwest::Client::new();
        let challenge = |scope: &str| {
            vec![Challenge::Bearer {
                realm: format!("{}/token", fake.url()),
                service: None,
                scope: Some(scope.to_owned()),
            }]
        };
        let (a, h, slow) = (
            auth.clone(),
            http.clone(),
            challenge("repository:slow:pull"),
        );
        let first = tokio::spawn(async move { a.answer(&h, "x", true, &slow, "", None).await });
        assert!(fake.wait_count("GET", "/token", 1, std::time::Duration::from_secs(10)));
        let other = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            auth.answer(
                &http,
                "x",
                true,
                &challenge("repository:fast:pull"),
                "",
                None,
            ),
        )
        .await;
        assert!(
            matches!(other, Ok(Ok(Some(_)))),
            "the other scope waited: {other:?}"
        );
        gate.open();
        assert!(first.await.unwrap().unwrap().is_some());
    }

    #[test]
    fn secrets_are_redacted() {
        let c = Credentials {
            username: "u".into(),
            password: Secret::new("hunter2"),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
