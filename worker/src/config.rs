//! The worker's settings: where its upstream is, where its cache lives, and
//! its credentials (from its own environment, which the supervisor built).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::auth::{Credentials, Secret};

/// Everything a worker needs to run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The registry API base, `https://host[:port]`.
    pub upstream: reqwest::Url,
    /// This upstream's cache root.
    pub storage: PathBuf,
    /// Unix socket to serve on (as started by the supervisor).
    pub socket: Option<PathBuf>,
    /// TCP address to serve on (standalone use).
    pub listen: Option<SocketAddr>,
    /// How long a tag -> digest answer is used before an upstream HEAD.
    pub tag_freshness: Duration,
    pub credentials: Option<Credentials>,
    pub drain_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{var}: cannot read {path}: {source}")]
    SecretFile {
        var: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{var} is set but {missing} is not")]
    HalfCredentials {
        var: &'static str,
        missing: &'static str,
    },
    #[error("invalid duration {value:?} in {var} (use e.g. 60s, 5m, 1h30m, 500ms)")]
    Duration { var: &'static str, value: String },
    #[error("invalid upstream URL {0:?}")]
    Upstream(String),
}

/// Reads `REGISTRY_PROXY_USERNAME`/`_PASSWORD`, or their `_FILE` forms (Docker
/// and Swarm secrets), from `env`.
pub fn credentials_from(
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<Credentials>, Error> {
    let read = |var: &'static str, file_var: &'static str| -> Result<Option<String>, Error> {
        if let Some(v) = env(var).filter(|v| !v.is_empty()) {
            return Ok(Some(v));
        }
        match env(file_var).filter(|v| !v.is_empty()) {
            Some(path) => std::fs::read_to_string(&path)
                .map(|s| Some(s.trim_end_matches(['\r', '\n']).to_owned()))
                .map_err(|source| Error::SecretFile {
                    var: file_var,
                    path,
                    source,
                }),
            None => Ok(None),
        }
    };
    let user = read("REGISTRY_PROXY_USERNAME", "REGISTRY_PROXY_USERNAME_FILE")?;
    let pass = read("REGISTRY_PROXY_PASSWORD", "REGISTRY_PROXY_PASSWORD_FILE")?;
    match (user, pass) {
        (Some(username), Some(p)) => Ok(Some(Credentials {
            username,
            password: Secret::new(p),
        })),
        (None, None) => Ok(None),
        (Some(_), None) => Err(Error::HalfCredentials {
            var: "REGISTRY_PROXY_USERNAME",
            missing: "REGISTRY_PROXY_PASSWORD",
        }),
        (None, Some(_)) => Err(Error::HalfCredentials {
            var: "REGISTRY_PROXY_PASSWORD",
            missing: "REGISTRY_PROXY_USERNAME",
        }),
    }
}

/// Parses a duration: Go style (`1h30m`, `500ms`, `60s`), Scala style as lhns
/// takes it (`30 s`, `2min`), or bare seconds (`60`).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..num_end].parse().ok()?;
        rest = rest[num_end..].trim_start();
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = rest[..unit_end].trim();
        rest = &rest[unit_end..];
        let scale = match unit {
            "ms" | "millis" | "milliseconds" => 0.001,
            "s" | "sec" | "secs" | "second" | "seconds" => 1.0,
            "m" | "min" | "mins" | "minute" | "minutes" => 60.0,
            "h" | "hour" | "hours" => 3600.0,
            "d" | "day" | "days" => 86400.0,
            _ => return None,
        };
        total += Duration::from_secs_f64(value * scale);
    }
    Some(total)
}

/// Parses the duration in `var` of `env`, or `default` when unset.
pub fn duration_from(
    env: impl Fn(&str) -> Option<String>,
    var: &'static str,
    default: Duration,
) -> Result<Duration, Error> {
    match env(var) {
        None => Ok(default),
        Some(v) => parse_duration(&v).ok_or(Error::Duration { var, value: v }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn durations() {
        for (s, secs) in [
            ("60", 60.0),
            ("60s", 60.0),
            ("5m", 300.0),
            ("1h30m", 5400.0),
            ("500ms", 0.5),
            ("2min", 120.0),
            ("30 s", 30.0),
        ] {
            assert_eq!(
                parse_duration(s),
                Some(Duration::from_secs_f64(secs)),
                "{s}"
            );
        }
        for bad in ["", "x", "5y", "m"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn credentials() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        let env: HashMap<&str, String> = [
            ("REGISTRY_PROXY_USERNAME", "u".to_string()),
            ("REGISTRY_PROXY_PASSWORD_FILE", file.display().to_string()),
        ]
        .into();
        let c = credentials_from(|k| env.get(k).cloned()).unwrap().unwrap();
        assert_eq!((c.username.as_str(), c.password.expose()), ("u", "s3cret"));
        assert!(credentials_from(|_| None).unwrap().is_none());
        let half: HashMap<&str, String> = [("REGISTRY_PROXY_USERNAME", "u".to_string())].into();
        assert!(credentials_from(|k| half.get(k).cloned()).is_err());
    }
}
