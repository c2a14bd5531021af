//! What a cache keeps: a size budget, a free-space floor, an expiry, and the
//! choice of what goes when one of them says something must: least recently
//! used first, a whole image at a time ([`Unit`]), never a pull in progress.

use std::collections::HashSet;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use crate::index::{Index, Unit};
use crate::{Digest, Key};

/// How long an incomplete image last used this recently counts as a pull in
/// progress, which eviction leaves alone.
pub const IN_PROGRESS: Duration = Duration::from_secs(60);

/// The limits of one cache.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    /// Most bytes of blobs and manifests kept (`REGCACHE_MAX_SIZE`).
    pub max_size: Option<u64>,
    /// Free space to leave on the cache's filesystem (`REGCACHE_MIN_FREE`).
    pub min_free: Option<MinFree>,
    /// Content unused for this long goes (`REGISTRY_PROXY_TTL`).
    pub ttl: Option<Duration>,
}

impl Policy {
    pub fn is_unlimited(&self) -> bool {
        *self == Policy::default()
    }

    /// How often a use of one item is written down: once a minute, or often
    /// enough for the TTL to see it (a quarter of it).
    pub fn touch_every(&self) -> Duration {
        let minute = Duration::from_secs(60);
        match self.ttl {
            Some(ttl) => (ttl / 4).clamp(Duration::from_millis(100), minute),
            None => minute,
        }
    }

    /// For logs and `check-config`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(m) = self.max_size {
            parts.push(format!("at most {}", size(m)));
        }
        if let Some(f) = &self.min_free {
            parts.push(format!("leaving {f} free"));
        }
        if let Some(t) = self.ttl {
            parts.push(format!(
                "removing what is unused for {}",
                humantime::format_duration(t)
            ));
        }
        if parts.is_empty() {
            "keeps everything".into()
        } else {
            parts.join(", ")
        }
    }
}

/// Bytes for people: `1.5 GiB`.
pub fn size(bytes: u64) -> String {
    bytesize::ByteSize::b(bytes).display().iec().to_string()
}

/// A size as operators write it: `50GiB`, `500MB`, `1024`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("{s:?} is not a size like 50GiB or 500MB: {e}"))
}

/// A free-space floor: an amount, or a share of the filesystem.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MinFree {
    Bytes(u64),
    Percent(f64),
}

impl MinFree {
    pub fn bytes(&self, total: u64) -> u64 {
        match *self {
            MinFree::Bytes(b) => b,
            MinFree::Percent(p) => (total as f64 * p / 100.0) as u64,
        }
    }
}

impl FromStr for MinFree {
    type Err = String;
    fn from_str(s: &str) -> Result<MinFree, String> {
        match s.trim().strip_suffix('%') {
            Some(p) => match p.trim().parse::<f64>() {
                Ok(p) if (0.0..100.0).contains(&p) => Ok(MinFree::Percent(p)),
                _ => Err(format!("{s:?} is not a percentage below 100%")),
            },
            None => parse_size(s).map(MinFree::Bytes),
        }
    }
}

impl std::fmt::Display for MinFree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MinFree::Bytes(b) => f.write_str(&size(*b)),
            MinFree::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// Why something was removed (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reason {
    /// Over `REGCACHE_MAX_SIZE`.
    Size,
    /// Below `REGCACHE_MIN_FREE`, or the disk was full.
    Disk,
    /// Unused for longer than `REGISTRY_PROXY_TTL`.
    Ttl,
}

impl Reason {
    pub const ALL: [Reason; 3] = [Reason::Size, Reason::Disk, Reason::Ttl];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Size => "size",
            Reason::Disk => "disk",
            Reason::Ttl => "ttl",
        }
    }
}

/// The cache's filesystem, as `statvfs` saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disk {
    pub total: u64,
    pub available: u64,
}

/// The moment a collection decides for.
#[derive(Debug, Clone)]
pub struct Moment<'a> {
    pub now: SystemTime,
    /// Room wanted on top of what is stored (a fill about to be written).
    pub need: u64,
    /// The filesystem, when it matters (a floor is set, or room is needed).
    pub disk: Option<Disk>,
    /// Digests being filled: images referring to them stay.
    pub filling: &'a HashSet<Digest>,
}

/// What the caller did with a unit it was offered.
pub enum Verdict {
    /// Removed; this many bytes freed.
    Evicted(u64),
    /// Kept after all (it was used after the index last heard).
    Kept,
}

/// Why `unit` should go now, if it should: expired, or the store is over its
/// budget or the disk under its floor after `freed` bytes already freed.
pub fn reason(
    unit: &Unit,
    stored: u64,
    freed: u64,
    policy: &Policy,
    at: &Moment,
) -> Option<Reason> {
    let age = at.now.duration_since(unit.used).unwrap_or_default();
    if policy.ttl.is_some_and(|ttl| age > ttl) {
        return Some(Reason::Ttl);
    }
    if policy.max_size.is_some_and(|max| stored + at.need > max) {
        return Some(Reason::Size);
    }
    if at
        .disk
        .is_some_and(|disk| disk.available + freed < floor(policy, disk) + at.need)
    {
        return Some(Reason::Disk);
    }
    None
}

/// Is `unit` off limits: an image still being pulled (one of its blobs is
/// filling, or it is incomplete and was used within [`IN_PROGRESS`])?
pub fn pinned(unit: &Unit, at: &Moment) -> bool {
    let recent = at.now.duration_since(unit.used).unwrap_or_default() < IN_PROGRESS;
    (!unit.complete && recent)
        || (unit.blobs.iter().chain(&unit.referenced))
            .chain(match &unit.root {
                Key::Blob(d) => Some(d),
                _ => None,
            })
            .any(|d| at.filling.contains(d))
}

/// The outcome of a collection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Collected {
    /// (reason, bytes freed) per evicted unit, in order.
    pub evicted: Vec<(Reason, u64)>,
    /// Does `need` fit now, within the budget and the floor?
    pub fits: bool,
}

/// Offers `act` the units of `index` that must go, least recently used
/// first, until nothing must; `act` removes one (from the index and the
/// disk) or keeps it. The index is `act`'s to change.
pub fn collect(
    index: &mut Index,
    policy: &Policy,
    at: &Moment,
    mut act: impl FnMut(&mut Index, &Unit) -> Verdict,
) -> Collected {
    let mut out = Collected::default();
    // What cannot fit even in an empty cache evicts nothing.
    if policy.max_size.is_some_and(|max| at.need > max) {
        return out;
    }
    let mut units = index.units();
    units.sort_by_key(|u| u.used);
    let mut freed = 0;
    for unit in &units {
        // Sorted by use: once this unit need not go, no later one (no older,
        // and under the same pressure) must either.
        let Some(why) = reason(unit, index.bytes(), freed, policy, at) else {
            break;
        };
        if pinned(unit, at) {
            continue;
        }
        if let Verdict::Evicted(bytes) = act(index, unit) {
            freed += bytes;
            out.evicted.push((why, bytes));
        }
    }
    out.fits = !pressure(index, freed, policy, at);
    out
}

/// Is the store over its budget, or the disk under its floor, counting `need`?
pub(crate) fn pressure(index: &Index, freed: u64, policy: &Policy, at: &Moment) -> bool {
    let over = policy
        .max_size
        .is_some_and(|max| index.bytes() + at.need > max);
    let under = at
        .disk
        .is_some_and(|disk| disk.available + freed < floor(policy, disk) + at.need);
    over || under
}

/// The free space to leave: `REGCACHE_MIN_FREE`, or none (but what is
/// about to be written must still fit).
fn floor(policy: &Policy, disk: Disk) -> u64 {
    policy.min_free.map_or(0, |f| f.bytes(disk.total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::ManifestEntry;
    use regcache_protocol::Algorithm;
    use std::time::UNIX_EPOCH;

    fn d(s: &str) -> Digest {
        Digest::of(Algorithm::Sha256, s.as_bytes())
    }

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// Images `name` of one `size`-byte layer used at `used`.
    fn index(images: &[(&str, u64, u64)]) -> Index {
        let mut ix = Index::default();
        for (name, size, used) in images {
            let layer = d(&format!("{name}-layer"));
            ix.add_blob(layer.clone(), *size, t(*used));
            ix.add_manifest(
                d(name),
                ManifestEntry {
                    size: 0,
                    used: t(*used),
                    blobs: vec![layer],
                    children: vec![],
                },
            );
        }
        ix
    }

    fn run(ix: &mut Index, policy: &Policy, at: &Moment) -> (Vec<Key>, Collected) {
        let mut gone = Vec::new();
        let c = collect(ix, policy, at, |ix, unit| {
            gone.push(unit.root.clone());
            Verdict::Evicted(ix.evict(unit).1)
        });
        (gone, c)
    }

    fn moment(now: u64, need: u64, filling: &HashSet<Digest>) -> Moment<'_> {
        Moment {
            now: t(now),
            need,
            disk: None,
            filling,
        }
    }

    #[test]
    fn over_budget_the_least_recently_used_images_go_until_it_fits() {
        let mut ix = index(&[("new", 40, 300), ("old", 40, 100), ("mid", 40, 200)]);
        let policy = Policy {
            max_size: Some(100),
            ..Policy::default()
        };
        let none = HashSet::new();
        let (gone, c) = run(&mut ix, &policy, &moment(1000, 30, &none));
        assert_eq!(gone, vec![Key::Manifest(d("old")), Key::Manifest(d("mid"))]);
        assert!(c.fits);
        assert_eq!(c.evicted, vec![(Reason::Size, 40), (Reason::Size, 40)]);
        assert_eq!(ix.bytes(), 40);
    }

    #[test]
    fn expiry_takes_only_what_is_unused_for_longer_than_the_ttl() {
        let mut ix = index(&[("used", 1, 950), ("unused", 1, 100)]);
        let policy = Policy {
            ttl: Some(Duration::from_secs(500)),
            ..Policy::default()
        };
        let none = HashSet::new();
        let (gone, c) = run(&mut ix, &policy, &moment(1000, 0, &none));
        assert_eq!(gone, vec![Key::Manifest(d("unused"))]);
        assert_eq!(c.evicted, vec![(Reason::Ttl, 1)]);
    }

    #[test]
    fn images_being_pulled_stay_and_a_need_that_cannot_fit_is_said() {
        let policy = Policy {
            max_size: Some(60),
            ..Policy::default()
        };
        // One of its layers is being filled: it stays, however old.
        let mut ix = index(&[("filling", 50, 1)]);
        ix.remove(&Key::Manifest(d("filling")));
        ix.add_manifest(
            d("filling"),
            ManifestEntry {
                size: 0,
                used: t(1),
                blobs: vec![d("filling-layer"), d("filling-next")],
                children: vec![],
            },
        );
        let filling = HashSet::from([d("filling-next")]);
        let (gone, c) = run(&mut ix, &policy, &moment(1000, 20, &filling));
        assert!(gone.is_empty(), "{gone:?}");
        assert!(!c.fits);

        // Missing a layer and used a moment ago: a pull in progress.
        let mut ix = index(&[("old", 50, 1)]);
        ix.add_manifest(
            d("partial"),
            ManifestEntry {
                size: 0,
                used: t(990),
                blobs: vec![d("partial-missing")],
                children: vec![],
            },
        );
        let none = HashSet::new();
        let (gone, c) = run(&mut ix, &policy, &moment(1000, 20, &none));
        assert_eq!(gone, vec![Key::Manifest(d("old"))]);
        assert!(c.fits);
    }

    #[test]
    fn the_free_space_floor_counts_what_was_freed() {
        let mut ix = index(&[("a", 30, 1), ("b", 30, 2), ("c", 30, 3)]);
        let policy = Policy {
            min_free: Some("10%".parse().unwrap()),
            ..Policy::default()
        };
        let none = HashSet::new();
        let at = Moment {
            disk: Some(Disk {
                total: 1000,
                available: 50,
            }),
            ..moment(1000, 0, &none)
        };
        let (gone, c) = run(&mut ix, &policy, &at);
        assert_eq!(gone, vec![Key::Manifest(d("a")), Key::Manifest(d("b"))]);
        assert_eq!(c.evicted[0].0, Reason::Disk);
        assert!(c.fits);
    }

    #[test]
    fn sizes_and_floors_parse_as_operators_write_them() {
        assert_eq!(parse_size("50GiB").unwrap(), 50 << 30);
        assert_eq!(parse_size("500MB").unwrap(), 500_000_000);
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert!(parse_size("lots").is_err());
        assert_eq!("10%".parse::<MinFree>().unwrap(), MinFree::Percent(10.0));
        assert_eq!("2GiB".parse::<MinFree>().unwrap(), MinFree::Bytes(2 << 30));
        assert!("120%".parse::<MinFree>().is_err());
        assert_eq!(MinFree::Percent(10.0).bytes(1000), 100);
    }
}
