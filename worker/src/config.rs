//! The worker's settings, from its own environment (which the supervisor
//! built: the inherited environment plus this upstream's `variables`).

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
    /// How long a tag -> digest answer is used before an upstream HEAD.
    pub tag_freshness: Duration,
    pub credentials: Option<Credentials>,
    /// How long shutdown waits for requests and fills in flight.
    pub drain_timeout: Duration,
}

/// Default wait for in-flight work at shutdown.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(30);
/// Default tag freshness (`REGCACHE_TAG_FRESHNESS`).
pub const DEFAULT_TAG_FRESHNESS: Duration = Duration::from_secs(60);

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
    #[error("REGISTRY_STORAGE={0} is not supported (yet): regcache stores on the filesystem")]
    Driver(String),
}

impl Settings {
    /// The settings for `upstream` caching in `storage`, the rest from `env`.
    pub fn from_env(
        upstream: &str,
        storage: PathBuf,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Settings, Error> {
        let upstream = upstream
            .parse()
            .map_err(|_| Error::Upstream(upstream.to_owned()))?;
        check_env(&env)?;
        Ok(Settings {
            upstream,
            storage,
            tag_freshness: duration_from(&env, "REGCACHE_TAG_FRESHNESS", DEFAULT_TAG_FRESHNESS)?,
            credentials: credentials_from(&env)?,
            drain_timeout: duration_from(&env, "REGISTRY_HTTP_DRAINTIMEOUT", DEFAULT_DRAIN)?,
        })
    }
}

/// What a worker would refuse at start, checked without starting one (the
/// supervisor runs this for every upstream before anything starts).
pub fn check_env(env: &impl Fn(&str) -> Option<String>) -> Result<(), Error> {
    credentials_from(env)?;
    duration_from(env, "REGCACHE_TAG_FRESHNESS", DEFAULT_TAG_FRESHNESS)?;
    duration_from(env, "REGISTRY_HTTP_DRAINTIMEOUT", DEFAULT_DRAIN)?;
    match env("REGISTRY_STORAGE").filter(|d| !d.is_empty() && d != "filesystem") {
        Some(driver) => Err(Error::Driver(driver)),
        None => Ok(()),
    }
}

/// Reads `REGISTRY_PROXY_USERNAME`/`_PASSWORD`, or their `_FILE` forms (Docker
/// and Swarm secrets), from `env`.
pub fn credentials_from(
    env: &impl Fn(&str) -> Option<String>,
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

/// Parses a duration with `humantime` (`1h30m`, `500ms`, `2min`, `30 s`);
/// a bare number is seconds, as registry:2 and lhns configurations write it.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    match s.parse::<u64>() {
        Ok(secs) => Some(Duration::from_secs(secs)),
        Err(_) => humantime::parse_duration(s).ok(),
    }
}

/// Parses the duration in `var` of `env`, or `default` when unset.
pub fn duration_from(
    env: &impl Fn(&str) -> Option<String>,
    var: &'static str,
    default: Duration,
) -> Result<Duration, Error> {
    match env(var).filter(|v| !v.trim().is_empty()) {
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
        for bad in ["", "x", "5 parsecs", "m"] {
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
        let c = credentials_from(&|k| env.get(k).cloned()).unwrap().unwrap();
        assert_eq!((c.username.as_str(), c.password.expose()), ("u", "s3cret"));
        assert!(credentials_from(&|_| None).unwrap().is_none());
        let half: HashMap<&str, String> = [("REGISTRY_PROXY_USERNAME", "u".to_string())].into();
        assert!(credentials_from(&|k| half.get(k).cloned()).is_err());
    }

    #[test]
    fn settings_from_env() {
        let env: HashMap<&str, String> = [("REGCACHE_TAG_FRESHNESS", "5m".to_string())].into();
        let s =
            Settings::from_env("https://ghcr.io", "/c".into(), |k| env.get(k).cloned()).unwrap();
        assert_eq!(s.tag_freshness, Duration::from_secs(300));
        assert_eq!(s.drain_timeout, DEFAULT_DRAIN);
        let s3: HashMap<&str, String> = [("REGISTRY_STORAGE", "s3".to_string())].into();
        let e = Settings::from_env("https://ghcr.io", "/c".into(), |k| s3.get(k).cloned());
        assert!(matches!(e, Err(Error::Driver(_))));
        assert!(Settings::from_env("not a url", "/c".into(), |_| None).is_err());
    }
}
