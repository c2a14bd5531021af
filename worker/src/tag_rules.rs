//! How long each tag's answer is trusted: `REGCACHE_TAG_RULES`, a list of
//! `pattern=freshness` separated by `;`, the first match winning, e.g.
//! `latest=0s;nightly-*=never;*=1h`.
//!
//! - A pattern is a glob (`*`, `?`, `[...]`) over the tag; one with a `:`
//!   is matched against `repository:tag` (`library/*:latest=0s`).
//! - A freshness is a duration (`0s`: revalidate with upstream on every
//!   pull) or `never`: the tag is passed through, its manifest never stored.
//! - Tags no rule matches use `REGCACHE_TAG_FRESHNESS`.

use std::time::Duration;

use globset::{Glob, GlobMatcher};
use regcache_protocol::{Name, Tag};

use crate::config::parse_duration;

/// What to do with one tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Answer from the cache for this long after upstream confirmed it.
    For(Duration),
    /// Ask upstream every time; store nothing of it.
    Never,
}

#[derive(Debug, Clone)]
struct Rule {
    matcher: GlobMatcher,
    /// Matched against `name:tag`, not the tag alone.
    qualified: bool,
    then: Freshness,
}

/// The rules, and the freshness of tags none matches.
#[derive(Debug, Clone)]
pub struct TagRules {
    rules: Vec<Rule>,
    default: Duration,
}

impl TagRules {
    /// No rules: every tag is fresh for `default`.
    pub fn uniform(default: Duration) -> TagRules {
        TagRules {
            rules: Vec::new(),
            default,
        }
    }

    /// Parses `REGCACHE_TAG_RULES`; the error says which rule and why.
    pub fn parse(text: &str, default: Duration) -> Result<TagRules, String> {
        let mut rules = Vec::new();
        for (i, raw) in text.split(';').enumerate() {
            let raw = raw.trim();
            if raw.is_empty() {
                continue;
            }
            let at = |why: String| format!("rule {} ({raw:?}): {why}", i + 1);
            let (pattern, value) = raw
                .split_once('=')
                .ok_or_else(|| at("expected pattern=duration or pattern=never".into()))?;
            let (pattern, value) = (pattern.trim(), value.trim());
            if pattern.is_empty() {
                return Err(at("empty pattern".into()));
            }
            let matcher = Glob::new(pattern)
                .map_err(|e| at(format!("bad pattern: {e}")))?
                .compile_matcher();
            let then = if value.eq_ignore_ascii_case("never") {
                Freshness::Never
            } else {
                Freshness::For(parse_duration(value).ok_or_else(|| {
                    at(format!(
                        "{value:?} is neither a duration (0s, 5m, 1h) nor never"
                    ))
                })?)
            };
            rules.push(Rule {
                matcher,
                qualified: pattern.contains(':'),
                then,
            });
        }
        Ok(TagRules { rules, default })
    }

    /// The freshness of `name:tag`.
    pub fn of(&self, name: &Name, tag: &Tag) -> Freshness {
        let qualified = format!("{name}:{tag}");
        self.rules
            .iter()
            .find(|r| {
                if r.qualified {
                    r.matcher.is_match(&qualified)
                } else {
                    r.matcher.is_match(tag.as_str())
                }
            })
            .map_or(Freshness::For(self.default), |r| r.then)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(rules: &TagRules, name: &str, tag: &str) -> Freshness {
        rules.of(&name.parse().unwrap(), &tag.parse().unwrap())
    }

    #[test]
    fn the_first_matching_rule_wins_and_unmatched_tags_use_the_default() {
        let r = TagRules::parse(
            "latest=0s; nightly-*=never; library/*:stable=5m; *=1h",
            Duration::from_secs(60),
        )
        .unwrap();
        assert_eq!(of(&r, "a/b", "latest"), Freshness::For(Duration::ZERO));
        assert_eq!(of(&r, "a/b", "nightly-2026-12-01"), Freshness::Never);
        assert_eq!(
            of(&r, "library/alpine", "stable"),
            Freshness::For(Duration::from_secs(300))
        );
        assert_eq!(
            of(&r, "other/app", "stable"),
            Freshness::For(Duration::from_secs(3600))
        );
        let none = TagRules::parse("latest=0s", Duration::from_secs(60)).unwrap();
        assert_eq!(
            of(&none, "a/b", "1.0"),
            Freshness::For(Duration::from_secs(60))
        );
    }

    #[test]
    fn bad_rules_say_which_and_why() {
        for (text, says) in [
            ("latest", "rule 1"),
            ("latest=0s;x=soon", "rule 2"),
            ("=1h", "empty pattern"),
            ("[=1h", "bad pattern"),
        ] {
            let e = TagRules::parse(text, Duration::ZERO).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
    }
}
