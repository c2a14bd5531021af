//! CONFIG: the JSON list of upstream registries, in the format of
//! lhns/docker-registry-cache (plus our `aliases`), parsed and validated once.
//!
//! ```json
//! ["ghcr.io",
//!  "http://127.0.0.1:15000",
//!  {"registry": "registry-1.docker.io",
//!   "variables": {"REGISTRY_PROXY_USERNAME": "u", "REGISTRY_PROXY_PASSWORD": "p"},
//!   "aliases": ["hub.local"]}]
//! ```
//! Every error names the item (by index and text) and says why.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use regcache_protocol::Authority;
use serde_json::Value;

/// The names under which Docker Hub is known; one upstream, API host first.
pub const DOCKER_HUB: [&str; 3] = ["registry-1.docker.io", "docker.io", "index.docker.io"];

/// The list used when no CONFIG is given: the common public registries.
pub const DEFAULT_CONFIG: &str = include_str!("default-config.json");

/// An invalid CONFIG: where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Error {
    /// Index of the offending item, when the problem is in one.
    pub item: Option<usize>,
    pub reason: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.item {
            Some(i) => write!(f, "invalid CONFIG: item {i}: {}", self.reason),
            None => write!(f, "invalid CONFIG: {}", self.reason),
        }
    }
}

/// One upstream registry, as the supervisor needs it.
#[derive(Clone, PartialEq, Eq)]
pub struct Upstream {
    pub index: usize,
    /// `http` or `https`.
    pub scheme: String,
    /// API host and port (Docker Hub's names all become `registry-1.docker.io`).
    pub authority: Authority,
    /// Extra names routed here (CONFIG `aliases`, Docker Hub's other names).
    pub aliases: Vec<String>,
    /// Environment for this upstream's worker only; may hold secrets.
    pub variables: BTreeMap<String, String>,
    /// lhns: an already running registry to use instead of a worker (accepted, unused).
    pub external_uri: Option<String>,
    /// lhns: wait for the worker to answer before routing (always done here).
    pub healthcheck: bool,
    /// Another upstream has the same host on another port: the bare host
    /// names neither.
    pub host_shared: bool,
}

impl fmt::Debug for Upstream {
    /// Variable values may be secrets: only their names are shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("index", &self.index)
            .field("url", &self.url())
            .field("aliases", &self.aliases)
            .field("variables", &self.variables.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Upstream {
    /// `host[:port]`: the upstream's own name, in logs and labels.
    pub fn name(&self) -> String {
        self.authority.to_string()
    }

    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.authority)
    }

    /// Is this the upstream that bare names (and `library/`) belong to?
    pub fn is_docker_hub(&self) -> bool {
        DOCKER_HUB.contains(&self.authority.host())
            || self
                .aliases
                .iter()
                .any(|a| DOCKER_HUB.contains(&a.as_str()))
    }

    /// Every name that routes here: authority, host (when unambiguous) and aliases.
    pub fn names(&self) -> Vec<String> {
        let mut names = vec![self.name()];
        if self.authority.port().is_some() && !self.host_shared {
            names.push(self.authority.host().to_owned());
        }
        names.extend(self.aliases.iter().cloned());
        if self.is_docker_hub() {
            names.extend(DOCKER_HUB.iter().map(|s| s.to_string()));
        }
        names.sort();
        names.dedup();
        names
    }

    /// The DNS names a request's `Host` may carry to mean this upstream
    /// (its host and aliases; never an IP address or `localhost`, which is
    /// how clients address the cache itself).
    pub fn hostnames(&self) -> Vec<String> {
        std::iter::once(self.authority.host())
            .chain(self.aliases.iter().map(String::as_str))
            .filter(|n| !n.contains(':') && *n != "localhost")
            .filter(|n| n.parse::<std::net::IpAddr>().is_err())
            .map(str::to_owned)
            .collect()
    }
}

/// The registry:2 variables regcache acts on; users copy whole distribution
/// configurations, so any other `REGISTRY_*` is reported once, not refused.
const KNOWN_REGISTRY_VARS: &[&str] = &[
    "REGISTRY_PROXY_USERNAME",
    "REGISTRY_PROXY_USERNAME_FILE",
    "REGISTRY_PROXY_PASSWORD",
    "REGISTRY_PROXY_PASSWORD_FILE",
    "REGISTRY_PROXY_TTL",
    "REGISTRY_STORAGE",
    "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY",
    "REGISTRY_STORAGE_REDIRECT_DISABLE",
    "REGISTRY_STORAGE_S3_BUCKET",
    "REGISTRY_STORAGE_S3_REGION",
    "REGISTRY_STORAGE_S3_REGIONENDPOINT",
    "REGISTRY_STORAGE_S3_ACCESSKEY",
    "REGISTRY_STORAGE_S3_ACCESSKEY_FILE",
    "REGISTRY_STORAGE_S3_SECRETKEY",
    "REGISTRY_STORAGE_S3_SECRETKEY_FILE",
    "REGISTRY_STORAGE_S3_ROOTDIRECTORY",
    "REGISTRY_STORAGE_S3_FORCEPATHSTYLE",
    "REGISTRY_STORAGE_S3_SECURE",
    "REGISTRY_STORAGE_S3_SKIPVERIFY",
    "REGISTRY_STORAGE_S3_CHUNKSIZE",
    "REGISTRY_HTTP_TLS_CERTIFICATE",
    "REGISTRY_HTTP_TLS_KEY",
    "REGISTRY_HTTP_DRAINTIMEOUT",
    "REGISTRY_AUTH_HTPASSWD_PATH",
    "REGISTRY_AUTH_HTPASSWD_REALM",
    "REGISTRY_LOG_LEVEL",
    "REGISTRY_LOG_FORMATTER",
];

/// The `REGISTRY_*` names among `names` that regcache does not use.
pub fn unused_registry_vars<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    names
        .into_iter()
        .filter(|n| n.starts_with("REGISTRY_"))
        .filter(|n| {
            !KNOWN_REGISTRY_VARS.contains(n) && !n.starts_with("REGISTRY_HTTP_TLS_CLIENTCAS_")
        })
        .collect()
}

/// What a valid CONFIG still does that its author may not expect.
pub fn warnings(upstreams: &[Upstream]) -> Vec<String> {
    let mut out = Vec::new();
    let mut seen = Vec::new();
    for up in upstreams.iter().filter(|u| u.host_shared) {
        let host = up.authority.host();
        if seen.contains(&host) {
            continue;
        }
        seen.push(host);
        let sharing: Vec<String> = upstreams
            .iter()
            .filter(|u| u.authority.host() == host)
            .map(Upstream::name)
            .collect();
        out.push(format!(
            "upstreams {} share the host {host:?}: it routes to none of them; reach each by its host:port or an alias",
            sharing.join(" and ")
        ));
    }
    out
}

/// Parses CONFIG text into the list of upstreams.
pub fn parse(text: &str) -> Result<Vec<Upstream>, Error> {
    let whole = |reason: String| Error { item: None, reason };
    let value: Value =
        serde_json::from_str(text).map_err(|e| whole(format!("not valid JSON: {e}")))?;
    let items = value
        .as_array()
        .ok_or_else(|| whole("must be a JSON array of registries".into()))?;
    if items.is_empty() {
        return Err(whole("the list of registries is empty".into()));
    }
    let upstreams = items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            parse_item(i, item).map_err(|reason| Error {
                item: Some(i),
                reason: format!("{reason} (in {})", short(item)),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut upstreams = upstreams;
    let hosts: Vec<String> = upstreams
        .iter()
        .map(|u| u.authority.host().to_owned())
        .collect();
    for up in &mut upstreams {
        up.host_shared = hosts.iter().filter(|h| *h == up.authority.host()).count() > 1;
    }
    check_unique_names(&upstreams)?;
    Ok(upstreams)
}

/// The item as the user wrote it, shortened, without variable values.
fn short(item: &Value) -> String {
    let shown = match item {
        Value::Object(o) => {
            let mut o = o.clone();
            if let Some(Value::Object(vars)) = o.get_mut("variables") {
                for v in vars.values_mut() {
                    *v = Value::String("…".into());
                }
            }
            Value::Object(o).to_string()
        }
        other => other.to_string(),
    };
    if shown.chars().count() > 120 {
        format!("{}…", shown.chars().take(120).collect::<String>())
    } else {
        shown
    }
}

fn parse_item(index: usize, item: &Value) -> Result<Upstream, String> {
    let (registry, obj) = match item {
        Value::String(s) => (s.as_str(), None),
        Value::Object(o) => match o.get("registry") {
            Some(Value::String(s)) => (s.as_str(), Some(o)),
            Some(_) => return Err("\"registry\" must be a string".into()),
            None => return Err("an object needs a \"registry\" field".into()),
        },
        _ => return Err("must be a registry string or an object with \"registry\"".into()),
    };
    let (scheme, host, port) = parse_registry(registry)?;
    let mut up = Upstream {
        index,
        authority: Authority::new(host, port),
        scheme,
        aliases: Vec::new(),
        variables: BTreeMap::new(),
        external_uri: None,
        healthcheck: true,
        host_shared: false,
    };
    let Some(obj) = obj else { return Ok(up) };
    for (key, value) in obj {
        match key.as_str() {
            "registry" => {}
            "variables" => up.variables = parse_variables(value)?,
            "aliases" => up.aliases = parse_aliases(value)?,
            "externalUri" => match value {
                Value::String(s) => up.external_uri = Some(s.clone()),
                Value::Null => {}
                _ => return Err("\"externalUri\" must be a string".into()),
            },
            "healthcheck" => match value {
                Value::Bool(b) => up.healthcheck = *b,
                _ => return Err("\"healthcheck\" must be true or false".into()),
            },
            other => {
                return Err(format!(
                    "unknown field {other:?} (known: registry, variables, aliases, externalUri, healthcheck)"
                ))
            }
        }
    }
    Ok(up)
}

/// `host[:port]`, optionally with `http://` or `https://`; nothing else.
fn parse_registry(s: &str) -> Result<(String, String, Option<u16>), String> {
    let (scheme, rest) = match s.split_once("://") {
        Some(("http", r)) => ("http", r),
        Some(("https", r)) => ("https", r),
        Some((other, _)) => {
            return Err(format!(
                "unsupported scheme {other:?} (use http:// or https://)"
            ))
        }
        None => ("https", s),
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#', '@']) {
        return Err(format!(
            "registry {s:?} must be a host[:port], without path, query or credentials"
        ));
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => {
            let port = p
                .parse::<u16>()
                .ok()
                .filter(|&p| p > 0)
                .ok_or_else(|| format!("invalid port {p:?} in {s:?}"))?;
            // A scheme's own port is no port at all (as URLs have it).
            let default = if scheme == "https" { 443 } else { 80 };
            (h, (port != default).then_some(port))
        }
        None => (rest, None),
    };
    let host = host.to_ascii_lowercase();
    let valid = !host.is_empty()
        && host.len() <= 253
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if !valid {
        return Err(format!("invalid registry host {host:?}"));
    }
    // All of Docker Hub's names mean its one API host.
    let host = if DOCKER_HUB.contains(&host.as_str()) {
        DOCKER_HUB[0].to_string()
    } else {
        host
    };
    Ok((scheme.to_string(), host, port))
}

fn parse_variables(v: &Value) -> Result<BTreeMap<String, String>, String> {
    let obj = v
        .as_object()
        .ok_or("\"variables\" must be an object of NAME: value")?;
    let mut out = BTreeMap::new();
    for (k, v) in obj {
        let valid_name = !k.is_empty()
            && !k.starts_with(|c: char| c.is_ascii_digit())
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid_name {
            return Err(format!(
                "variable name {k:?} is not a valid environment name"
            ));
        }
        let value = match v {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            _ => return Err(format!("variable {k} must be a string, number or boolean")),
        };
        if value.contains('\0') {
            return Err(format!("variable {k} contains a NUL byte"));
        }
        out.insert(k.clone(), value);
    }
    Ok(out)
}

fn parse_aliases(v: &Value) -> Result<Vec<String>, String> {
    let list = v.as_array().ok_or("\"aliases\" must be a list of names")?;
    list.iter()
        .map(|a| {
            let a = a.as_str().ok_or("every alias must be a string")?;
            let a = a.to_ascii_lowercase();
            let (name, port) = match a.rsplit_once(':') {
                Some((n, p)) if p.parse::<u16>().is_ok() => (n.to_string(), Some(p)),
                _ => (a.clone(), None),
            };
            let ok = regcache_protocol::reference::valid_component(&name);
            if !ok {
                return Err(format!(
                    "alias {a:?} must be a host name like \"hub.local\" (lowercase letters, digits, '.', '-')"
                ));
            }
            Ok(match port {
                Some(p) => format!("{name}:{p}"),
                None => name,
            })
        })
        .collect()
}

/// No name may route to two upstreams.
fn check_unique_names(upstreams: &[Upstream]) -> Result<(), Error> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    for up in upstreams {
        let mut own = vec![up.name()];
        own.extend(up.aliases.iter().cloned());
        if up.is_docker_hub() {
            own.extend(DOCKER_HUB.iter().map(|s| s.to_string()));
        }
        own.sort();
        own.dedup();
        for name in own {
            if let Some(&other) = seen.get(&name) {
                return Err(Error {
                    item: Some(up.index),
                    reason: format!("name {name:?} is already used by item {other}"),
                });
            }
            seen.insert(name, up.index);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lhns_formats() {
        let ups = parse(
            r#"["ghcr.io", "http://127.0.0.1:15000",
                {"registry": "registry-1.docker.io", "variables": {"REGISTRY_PROXY_USERNAME": "u", "REGISTRY_PROXY_PASSWORD": "p", "N": 1}},
                {"registry": "https://quay.io/", "externalUri": "http://x:5000", "healthcheck": false}]"#,
        )
        .unwrap();
        assert_eq!(ups[0].url(), "https://ghcr.io");
        assert_eq!(ups[1].url(), "http://127.0.0.1:15000");
        assert_eq!(ups[1].authority.dir_name(), "127.0.0.1_15000");
        assert!(ups[2].is_docker_hub());
        assert_eq!(ups[2].variables["N"], "1");
        assert_eq!(ups[3].authority.host(), "quay.io");
        assert!(!ups[3].healthcheck);
        assert!(!format!("{:?}", ups[2]).contains("\"p\""));
    }

    #[test]
    fn docker_hub_names_are_one_upstream() {
        let ups = parse(r#"["docker.io"]"#).unwrap();
        assert_eq!(ups[0].name(), "registry-1.docker.io");
        assert!(ups[0].names().contains(&"index.docker.io".to_string()));
        let ups =
            parse(r#"[{"registry": "http://127.0.0.1:1", "aliases": ["docker.io"]}]"#).unwrap();
        assert!(ups[0].is_docker_hub());
    }

    #[test]
    fn default_ports_and_hostnames() {
        let ups = parse(
            r#"["https://ghcr.io:443", "http://h.test:80",
                {"registry": "http://127.0.0.1:15000", "aliases": ["upstream.test", "10.0.0.1", "a.test:5000"]}]"#,
        )
        .unwrap();
        assert_eq!(ups[0].name(), "ghcr.io");
        assert_eq!(ups[1].url(), "http://h.test");
        assert_eq!(ups[0].hostnames(), ["ghcr.io"]);
        assert_eq!(ups[2].hostnames(), ["upstream.test"]);
    }

    #[test]
    fn a_host_shared_by_two_ports_routes_to_neither_and_is_said() {
        let ups =
            parse(r#"["http://127.0.0.1:1", "http://127.0.0.1:2", "http://h.test:3"]"#).unwrap();
        assert!(!ups[0].names().contains(&"127.0.0.1".to_string()));
        assert!(!ups[1].names().contains(&"127.0.0.1".to_string()));
        assert!(ups[2].names().contains(&"h.test".to_string()));
        let w = warnings(&ups);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("127.0.0.1:1 and 127.0.0.1:2"), "{w:?}");
    }

    #[test]
    fn default_config_is_valid() {
        let ups = parse(DEFAULT_CONFIG).unwrap();
        assert_eq!(ups.len(), 9);
        assert!(ups[0].is_docker_hub());
    }

    #[test]
    fn errors_name_the_item_and_reason() {
        let cases: &[(&str, Option<usize>, &str)] = &[
            ("not json", None, "not valid JSON"),
            ("{}", None, "JSON array"),
            ("[]", None, "empty"),
            (r#"["ghcr.io", 5]"#, Some(1), "registry string"),
            (r#"[{"variables": {}}]"#, Some(0), "\"registry\" field"),
            (r#"[{"registry": 1}]"#, Some(0), "must be a string"),
            (r#"["ftp://x.io"]"#, Some(0), "unsupported scheme"),
            (r#"["ghcr.io/org"]"#, Some(0), "without path"),
            (r#"["https://u:p@ghcr.io"]"#, Some(0), "credentials"),
            (r#"["ghcr.io:99999"]"#, Some(0), "invalid port"),
            (r#"["bad host"]"#, Some(0), "invalid registry host"),
            (
                r#"["ghcr.io", "ghcr.io"]"#,
                Some(1),
                "already used by item 0",
            ),
            (
                r#"["docker.io", {"registry": "x.io", "aliases": ["docker.io"]}]"#,
                Some(1),
                "already used",
            ),
            (
                r#"[{"registry": "x.io", "aliases": ["Bad/Alias"]}]"#,
                Some(0),
                "alias",
            ),
            (
                r#"[{"registry": "x.io", "variables": {"1X": "v"}}]"#,
                Some(0),
                "environment name",
            ),
            (
                r#"[{"registry": "x.io", "variables": {"X": []}}]"#,
                Some(0),
                "string, number",
            ),
            (
                r#"[{"registry": "x.io", "extra": 1}]"#,
                Some(0),
                "unknown field",
            ),
        ];
        for (text, item, reason) in cases {
            let e = parse(text).unwrap_err();
            assert_eq!(e.item, *item, "{text}: {e}");
            assert!(e.reason.contains(reason), "{text}: {e}");
        }
    }

    #[test]
    fn unused_registry_variables_are_found() {
        let names = [
            "REGISTRY_PROXY_PASSWORD",
            "REGISTRY_HTTP_TLS_CLIENTCAS_3",
            "REGISTRY_STORAGE_S3_BUCKET",
            "PATH",
            "REGISTRY_NOTIFICATIONS_X",
        ];
        assert_eq!(unused_registry_vars(names), ["REGISTRY_NOTIFICATIONS_X"]);
    }

    #[test]
    fn errors_do_not_show_variable_values() {
        let e = parse(r#"[{"registry": "x.io", "variables": {"REGISTRY_PROXY_PASSWORD": "hunter2"}, "bad": 1}]"#)
            .unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }
}
