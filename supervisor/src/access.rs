//! Who may pull what: an access policy over the front's htpasswd users.
//!
//! Without a policy every authenticated user (or, without htpasswd, every
//! client) may pull everything: the cache fetches with its own credentials,
//! so it hands out whatever those credentials can see. With a policy
//! (`REGCACHE_ACCESS_FILE`, or `REGCACHE_ACCESS` with `;` between lines),
//! each line grants repositories to one caller:
//!
//! ```text
//! # who       what (upstream name or alias / repository; * is any run of characters)
//! alice       ghcr.io/acme/*  registry.internal/*
//! *           docker.io/library/*     # any authenticated user
//! anonymous   docker.io/library/*     # clients without credentials
//! ```
//!
//! What `anonymous` may pull, everyone may. A request outside every grant is
//! refused: 401 (log in) without credentials, 403 `DENIED` with them.

use crate::config::Upstream;

/// An invalid policy: which line and why.
#[derive(Debug, thiserror::Error)]
#[error("access policy line {line}: {reason}")]
pub struct Error {
    pub line: usize,
    pub reason: String,
}

/// Who asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Anonymous,
    User(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Who {
    Anonymous,
    AnyUser,
    User(String),
}

#[derive(Debug, Clone)]
struct Grant {
    who: Who,
    patterns: Vec<String>,
}

/// The grants, in file order.
#[derive(Debug, Clone)]
pub struct Policy {
    grants: Vec<Grant>,
}

impl Policy {
    pub fn parse(text: &str) -> Result<Policy, Error> {
        let mut grants = Vec::new();
        for (n, raw) in text.split(['\n', ';']).enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut words = line.split_whitespace();
            let who = match words.next().expect("a non-empty line has a word") {
                "anonymous" => Who::Anonymous,
                "*" => Who::AnyUser,
                user => Who::User(user.to_owned()),
            };
            let patterns: Vec<String> = words.map(|p| p.to_ascii_lowercase()).collect();
            let fail = |reason: String| Error {
                line: n + 1,
                reason,
            };
            if patterns.is_empty() {
                return Err(fail(format!(
                    "{line:?} grants nothing (write: who upstream/repository ...)"
                )));
            }
            if let Some(bad) = patterns.iter().find(|p| *p != "*" && !p.contains('/')) {
                return Err(fail(format!(
                    "{bad:?} is not upstream/repository (e.g. ghcr.io/org/*)"
                )));
            }
            grants.push(Grant { who, patterns });
        }
        Ok(Policy { grants })
    }

    /// May `caller` pull `repository` of `upstream`?
    pub fn allows(&self, caller: &Caller, upstream: &Upstream, repository: &str) -> bool {
        let names = upstream.names();
        self.grants
            .iter()
            .filter(|g| match (&g.who, caller) {
                (Who::Anonymous, _) => true,
                (Who::AnyUser, Caller::User(_)) => true,
                (Who::User(u), Caller::User(c)) => u == c,
                _ => false,
            })
            .flat_map(|g| &g.patterns)
            .any(|p| names.iter().any(|n| glob(p, &format!("{n}/{repository}"))))
    }

    /// Does anything at all go to clients without credentials?
    pub fn has_anonymous(&self) -> bool {
        self.grants.iter().any(|g| g.who == Who::Anonymous)
    }
}

/// `*` matches any run of characters (`/` included); everything else itself.
fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    for (i, part) in parts.iter().enumerate() {
        if i == parts.len() - 1 {
            return rest.ends_with(part);
        }
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    #[test]
    fn globs() {
        for (p, t, want) in [
            ("ghcr.io/acme/*", "ghcr.io/acme/app", true),
            ("ghcr.io/acme/*", "ghcr.io/acme/team/app", true),
            ("ghcr.io/acme/*", "ghcr.io/acmex/app", false),
            ("*", "anything/at/all", true),
            ("docker.io/library/debian", "docker.io/library/debian", true),
            (
                "docker.io/library/debian",
                "docker.io/library/debian2",
                false,
            ),
            ("a/*-dev", "a/x-dev", true),
            ("a/*-dev", "a/x-prod", false),
        ] {
            assert_eq!(glob(p, t), want, "{p} ~ {t}");
        }
    }

    #[test]
    fn grants_by_caller_and_name() {
        let ups = config::parse(r#"["docker.io", {"registry": "http://10.0.0.5:5000", "aliases": ["registry.internal"]}]"#)
            .unwrap();
        let p = Policy::parse(
            "# team\nalice ghcr.io/x/* registry.internal/team/*\n* docker.io/library/*; anonymous docker.io/library/alpine",
        )
        .unwrap();
        let alice = Caller::User("alice".into());
        let bob = Caller::User("bob".into());
        let anon = Caller::Anonymous;
        assert!(p.allows(&alice, &ups[1], "team/app"));
        assert!(!p.allows(&bob, &ups[1], "team/app"));
        assert!(
            p.allows(&bob, &ups[0], "library/debian"),
            "any user, by a Docker Hub name"
        );
        assert!(!p.allows(&anon, &ups[0], "library/debian"));
        assert!(p.allows(&anon, &ups[0], "library/alpine"));
        assert!(
            p.allows(&bob, &ups[0], "library/alpine"),
            "what anonymous may, everyone may"
        );
        assert!(p.has_anonymous());
    }

    #[test]
    fn errors_name_the_line() {
        let e = Policy::parse("alice ghcr.io/x/*\nbob").unwrap_err();
        assert_eq!(e.line, 2);
        let e = Policy::parse("alice ghcr.io").unwrap_err();
        assert!(e.reason.contains("upstream/repository"), "{e}");
    }
}
