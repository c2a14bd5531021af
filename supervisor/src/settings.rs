//! The supervisor's settings, assembled once from flags, CONFIG and the
//! environment, with every problem found before anything starts.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::client_auth::Htpasswd;
use crate::config::{self, Upstream};
use crate::{routing, tls, workers};

/// How the supervisor runs.
#[derive(Clone)]
pub struct Settings {
    pub upstreams: Vec<Upstream>,
    /// Root of all caches; each upstream gets `<storage>/<host[_port]>`.
    pub storage: PathBuf,
    /// Grace period for in-flight work at shutdown.
    pub drain_timeout: Duration,
    /// Client authentication (htpasswd), if configured.
    pub auth: Option<Arc<Htpasswd>>,
    /// Who may pull what, if configured (`REGCACHE_ACCESS_FILE`, `REGCACHE_ACCESS`).
    pub access: Option<Arc<crate::access::Policy>>,
    /// HTTPS on the front, if configured.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The binary started as `regcache worker` for each upstream.
    pub worker_exe: PathBuf,
    pub limits: Limits,
    /// This replica's side of a cluster: the listener other replicas ask
    /// (`REGCACHE_PEER_LISTEN`) and the secret they must show.
    pub cluster: Option<Cluster>,
    /// `REGCACHE_PRELOAD_FILE` and `REGCACHE_PRELOAD_EVERY`.
    pub preload: Option<crate::preload::Schedule>,
    /// `REGCACHE_ADMIN_TOKEN` (or `_FILE`): turns the admin endpoint on.
    pub admin_token: Option<regcache_worker::Secret>,
}

/// The peer listener of a replica.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub listen: std::net::SocketAddr,
    pub secret: regcache_worker::config::PeerSecret,
}

/// What one client may hold of the front.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `REGCACHE_HEADER_TIMEOUT`: to send a request's headers, and the longest
    /// a connection may sit idle between requests (slowloris, dead clients).
    pub header_timeout: Duration,
    /// `REGCACHE_MAX_CONNECTIONS`: client connections served at once; more
    /// wait in the listen queue.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_secs(15),
            max_connections: 16_384,
        }
    }
}

/// What the command line says.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    /// `--config FILE` (or `CONFIG_FILE`).
    pub config_file: Option<PathBuf>,
    /// `--storage DIR` (or `REGCACHE_STORAGE`).
    pub storage: Option<PathBuf>,
}

/// Why the settings cannot be assembled (exit 64: the configuration is wrong).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read --config {path}: {source}")]
    ReadConfig {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{error} (from {from})")]
    Config { error: config::Error, from: String },
    #[error(transparent)]
    Htpasswd(#[from] crate::client_auth::Error),
    #[error("{var}: {error}")]
    Access {
        var: &'static str,
        error: crate::access::Error,
    },
    #[error("REGCACHE_ACCESS_FILE {path}: {source}")]
    ReadAccess {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::Error),
    #[error(transparent)]
    Duration(#[from] regcache_worker::config::Error),
    #[error("the regcache executable: {0}")]
    Exe(std::io::Error),
    #[error("REGCACHE_PEER_LISTEN {0:?} is not an address like 0.0.0.0:5001")]
    PeerListen(String),
    #[error("cannot read {path}: {source}")]
    ReadPreload {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("REGCACHE_PRELOAD_FILE {path}: {why}")]
    Preload { path: String, why: String },
    #[error("REGCACHE_ADMIN_TOKEN must be at least 16 characters")]
    AdminToken,
}

impl Settings {
    /// Settings from `flags` and `env`: CONFIG from `--config`, else the
    /// `CONFIG` variable, else the embedded default list.
    pub fn from_env(flags: Flags, env: impl Fn(&str) -> Option<String>) -> Result<Settings, Error> {
        let env = |k: &str| env(k).filter(|v| !v.is_empty());
        let (text, source) = match (&flags.config_file, env("CONFIG")) {
            (Some(path), _) => (
                std::fs::read_to_string(path).map_err(|source| Error::ReadConfig {
                    path: path.display().to_string(),
                    source,
                })?,
                format!("--config {}", path.display()),
            ),
            (None, Some(text)) => (text, "the CONFIG variable".to_string()),
            (None, None) => (
                config::DEFAULT_CONFIG.to_string(),
                "the embedded default".to_string(),
            ),
        };
        let upstreams = config::parse(&text).map_err(|error| Error::Config {
            error,
            from: source,
        })?;
        let storage = flags
            .storage
            .or_else(|| env("REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("regcache-data"));
        let auth = match env("REGISTRY_AUTH_HTPASSWD_PATH") {
            Some(path) => Some(Arc::new(Htpasswd::load(
                &path,
                env("REGISTRY_AUTH_HTPASSWD_REALM"),
            )?)),
            None => None,
        };
        let access = match (env("REGCACHE_ACCESS_FILE"), env("REGCACHE_ACCESS")) {
            (Some(path), _) => {
                let text = std::fs::read_to_string(&path)
                    .map_err(|source| Error::ReadAccess { path, source })?;
                let policy =
                    crate::access::Policy::parse(&text).map_err(|error| Error::Access {
                        var: "REGCACHE_ACCESS_FILE",
                        error,
                    })?;
                Some(Arc::new(policy))
            }
            (None, Some(text)) => {
                let policy =
                    crate::access::Policy::parse(&text).map_err(|error| Error::Access {
                        var: "REGCACHE_ACCESS",
                        error,
                    })?;
                Some(Arc::new(policy))
            }
            (None, None) => None,
        };
        regcache_worker::init_tls();
        let tls = tls::from_env(env)?;
        let drain_timeout = regcache_worker::config::duration_from(
            &env,
            "REGISTRY_HTTP_DRAINTIMEOUT",
            regcache_worker::config::DEFAULT_DRAIN,
        )?;
        let defaults = Limits::default();
        let limits = Limits {
            header_timeout: regcache_worker::config::duration_from(
                &env,
                "REGCACHE_HEADER_TIMEOUT",
                defaults.header_timeout,
            )?,
            max_connections: regcache_worker::config::number_from(
                &env,
                "REGCACHE_MAX_CONNECTIONS",
                defaults.max_connections,
            )?,
        };
        let cluster = match env("REGCACHE_PEER_LISTEN") {
            None => None,
            Some(addr) => Some(Cluster {
                listen: addr
                    .trim()
                    .parse()
                    .map_err(|_| Error::PeerListen(addr.clone()))?,
                secret: regcache_worker::config::peer_secret_from(&env)?,
            }),
        };
        let preload = match env("REGCACHE_PRELOAD_FILE") {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(&path).map_err(|source| Error::ReadPreload {
                    path: path.clone(),
                    source,
                })?;
                let items = crate::preload::parse_list(&text).map_err(|why| Error::Preload {
                    path: path.clone(),
                    why,
                })?;
                let every = regcache_worker::config::duration_from(
                    &env,
                    "REGCACHE_PRELOAD_EVERY",
                    std::time::Duration::from_secs(6 * 3600),
                )?;
                Some(crate::preload::Schedule { path, items, every })
            }
        };
        let admin_token = match (
            env("REGCACHE_ADMIN_TOKEN"),
            env("REGCACHE_ADMIN_TOKEN_FILE"),
        ) {
            (Some(t), _) => Some(t),
            (None, Some(path)) => Some(
                std::fs::read_to_string(&path)
                    .map(|s| s.trim_end_matches(['\r', '\n']).to_owned())
                    .map_err(|source| Error::ReadPreload { path, source })?,
            ),
            (None, None) => None,
        };
        if admin_token.as_ref().is_some_and(|t| t.len() < 16) {
            return Err(Error::AdminToken);
        }
        let admin_token = admin_token.map(regcache_worker::Secret::new);
        Ok(Settings {
            preload,
            admin_token,
            upstreams,
            storage,
            drain_timeout,
            auth,
            access,
            tls,
            worker_exe: std::env::current_exe().map_err(Error::Exe)?,
            limits,
            cluster,
        })
    }

    /// The storage root of one upstream: `REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY`
    /// in its own variables wins (as in lhns, variables override everything).
    pub fn storage_of(&self, up: &Upstream) -> PathBuf {
        match up
            .variables
            .get("REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY")
        {
            Some(dir) => PathBuf::from(dir),
            None => self.storage.join(up.authority.dir_name()),
        }
    }

    /// What each worker would refuse at start, checked against `inherited`
    /// (the supervisor's own environment).
    pub fn check_workers(&self, inherited: &[(String, String)]) -> Result<(), config::Error> {
        workers::check_worker_env(inherited, &self.upstreams)
    }

    /// What the operator should know before it runs: credentials from the
    /// environment given to several upstreams, names that cannot route.
    pub fn warnings(&self, inherited: &[(String, String)]) -> Vec<String> {
        let mut out = config::warnings(&self.upstreams);
        let peers = inherited
            .iter()
            .any(|(k, v)| k == "REGCACHE_PEERS" && !v.is_empty());
        if peers && self.cluster.is_none() {
            out.push(
                "REGCACHE_PEERS is set but REGCACHE_PEER_LISTEN is not: this replica asks the others \
                 but cannot be asked (it owns nothing)"
                    .into(),
            );
        }
        let given = workers::inherited_credentials(inherited, &self.upstreams);
        if !given.is_empty() {
            out.push(format!(
                "REGISTRY_PROXY_USERNAME/PASSWORD from the environment are given to: {} \
                 (limit with REGCACHE_INHERIT_CREDENTIALS=<names>|none, or set them in each entry's variables)",
                given.join(", ")
            ));
        }
        out
    }

    /// What `regcache check-config` prints: upstreams, names, storage, routing.
    /// `inherited` is the supervisor's environment (each worker's store and
    /// credentials follow from it and the entry's variables).
    pub fn describe(&self, listen: &str, inherited: &[(String, String)]) -> String {
        let given = workers::inherited_credentials(inherited, &self.upstreams);
        let mut s = format!(
            "listen: {listen}\nstorage: {}\nupstreams:\n",
            self.storage.display()
        );
        for up in &self.upstreams {
            s.push_str(&format!(
                "  [{}] {}{}\n      names: {}\n      storage: {}\n",
                up.index,
                up.url(),
                if up.is_docker_hub() {
                    " (Docker Hub)"
                } else {
                    ""
                },
                up.names().join(", "),
                self.storage_of(up).display(),
            ));
            let env = workers::worker_env(inherited.iter().cloned(), up);
            let store = regcache_worker::config::StoreSettings::from_env(
                &|k| env.get(k).cloned(),
                &up.authority.dir_name(),
            )
            .map_or_else(
                |e| format!("invalid: {e}"),
                |st| st.describe(&self.storage_of(up)),
            );
            let credentials = if ["REGISTRY_PROXY_USERNAME", "REGISTRY_PROXY_USERNAME_FILE"]
                .iter()
                .any(|k| up.variables.contains_key(*k))
            {
                "its own (variables)"
            } else if given.contains(&up.name()) {
                "inherited from the environment"
            } else {
                "none (anonymous)"
            };
            let policy = regcache_worker::config::policy_from(&|k| env.get(k).cloned())
                .map_or_else(|e| format!("invalid: {e}"), |p| p.describe());
            s.push_str(&format!(
                "      store: {store}\n      keeps: {policy}\n      credentials: {credentials}\n"
            ));
            if !up.variables.is_empty() {
                // Names only: values may be secrets.
                let names: Vec<&str> = up.variables.keys().map(String::as_str).collect();
                s.push_str(&format!("      variables: {}\n", names.join(", ")));
            }
        }
        s.push_str(&routing::Routes::new(&self.upstreams).describe(&self.upstreams));
        s.push_str(&format!(
            "client auth: {}{}\ntls: {}\n",
            if self.auth.is_some() {
                "htpasswd"
            } else {
                "off"
            },
            if self.access.is_some() {
                ", access policy"
            } else {
                ""
            },
            if self.tls.is_some() { "on" } else { "off" },
        ));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn assembled_from_flags_and_environment() {
        let env: HashMap<&str, String> = [
            ("CONFIG", r#"["ghcr.io", {"registry": "quay.io", "variables": {"REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": "/elsewhere"}}]"#.to_string()),
            ("REGISTRY_HTTP_DRAINTIMEOUT", "5s".to_string()),
        ]
        .into();
        let flags = Flags {
            storage: Some("/data".into()),
            ..Flags::default()
        };
        let s = Settings::from_env(flags, |k| env.get(k).cloned()).unwrap();
        assert_eq!(s.drain_timeout, Duration::from_secs(5));
        assert_eq!(
            s.storage_of(&s.upstreams[0]),
            PathBuf::from("/data/ghcr.io")
        );
        assert_eq!(s.storage_of(&s.upstreams[1]), PathBuf::from("/elsewhere"));
        let shown = s.describe("0.0.0.0:5000", &[]);
        assert!(shown.contains("[1] https://quay.io"), "{shown}");
        assert!(shown.contains("store: filesystem /data/ghcr.io"), "{shown}");
        let s3 = [
            ("REGISTRY_STORAGE".to_string(), "s3".to_string()),
            (
                "REGISTRY_STORAGE_S3_BUCKET".to_string(),
                "cache".to_string(),
            ),
            (
                "REGISTRY_STORAGE_S3_SECRETKEY".to_string(),
                "hunter2".to_string(),
            ),
            (
                "REGISTRY_STORAGE_S3_ACCESSKEY".to_string(),
                "AK".to_string(),
            ),
        ];
        let shown = s.describe("0.0.0.0:5000", &s3);
        assert!(
            shown.contains("store: s3 bucket=cache region=us-east-1 endpoint=aws prefix=ghcr.io"),
            "{shown}"
        );
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn errors_say_where() {
        let bad: HashMap<&str, String> = [("CONFIG", "[5]".to_string())].into();
        let Err(e) = Settings::from_env(Flags::default(), |k| bad.get(k).cloned()) else {
            panic!("a bad CONFIG was taken")
        };
        assert!(
            e.to_string().contains("item 0") && e.to_string().contains("the CONFIG variable"),
            "{e}"
        );
        let default = Settings::from_env(Flags::default(), |_| None).unwrap();
        assert_eq!(default.upstreams.len(), 9);
        let missing = Flags {
            config_file: Some("/nonexistent/config.json".into()),
            ..Flags::default()
        };
        assert!(matches!(
            Settings::from_env(missing, |_| None),
            Err(Error::ReadConfig { .. })
        ));
    }
}
