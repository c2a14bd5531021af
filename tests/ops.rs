//! End-to-end tests of operations (issue 5): `/metrics` (checked with a
//! strict exposition-format parser), SIGTERM drain and SIGKILL recovery,
//! `/readyz`, the inventory API and `_catalog`, the access log,
//! `regcache healthcheck`, what the processes share of the binary, and
//! the CPU priority they run at.
//! Upstreams are the in-process fake ([`support::fake`]), so every upstream
//! request is counted and a fill can be held at a chosen point.
//!
//! Run: `cargo test --test ops -- --test-threads=2`
//! Needs: skopeo on PATH.

use regcache_testkit as support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::fake::{ms, FakeRegistry, Gate, Serve};
use support::*;

/// Opens `gate` when dropped, so that a failing test never leaves a fill
/// (and the threads reading it) waiting.
struct OpenOnDrop(Gate);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}

/// Total size of an image's blobs (layers and config).
fn blob_bytes(image: &ImageParts) -> u64 {
    image.layer_sizes.iter().sum::<u64>() + image.config.len() as u64
}

// ---------------------------------------------------------------------------
// a strict Prometheus text exposition (0.0.4) parser
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

#[derive(Debug)]
struct Family {
    name: String,
    kind: String,
    help: Option<String>,
    samples: Vec<Sample>,
}

#[derive(Debug)]
struct Exposition {
    families: Vec<Family>,
}

impl Exposition {
    fn family(&self, name: &str) -> Option<&Family> {
        self.families.iter().find(|f| f.name == name)
    }

    /// Every sample named `name` (in any family).
    fn samples(&self, name: &str) -> Vec<&Sample> {
        self.families
            .iter()
            .flat_map(|f| f.samples.iter())
            .filter(|s| s.name == name)
            .collect()
    }

    /// The value of the sample `name` whose label set is exactly `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples(name)
            .into_iter()
            .find(|s| s.labels == want)
            .map(|s| s.value)
    }

    /// Like [`Exposition::value`], 0 when the series does not exist (yet).
    fn count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or(0.0)
    }
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A Go `strconv.ParseFloat`-style number as Prometheus writes it, or
/// `NaN`/`+Inf`/`-Inf`.
fn parse_value(s: &str) -> Option<f64> {
    match s {
        "NaN" => return Some(f64::NAN),
        "+Inf" => return Some(f64::INFINITY),
        "-Inf" => return Some(f64::NEG_INFINITY),
        _ => {}
    }
    let body = s.strip_prefix(['+', '-']).unwrap_or(s);
    let (mantissa, exponent) = match body.find(['e', 'E']) {
        Some(i) => (&body[..i], Some(&body[i + 1..])),
        None => (body, None),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = digits(int) && digits(frac) && !(int.is_empty() && frac.is_empty());
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && digits(e)
    });
    (mantissa_ok && exponent_ok)
        .then(|| s.parse().ok())
        .flatten()
}

/// Unescapes a HELP text: only `\\` and `\n` are allowed escapes.
fn check_help_escapes(text: &str) -> Result<(), String> {
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('\\') | Some('n') => {}
                other => return Err(format!("bad escape \\{other:?} in HELP text")),
            }
        }
    }
    Ok(())
}

/// Parses `{a="x",b="y"}` at the start of `s`; returns the labels and the rest.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = s.strip_prefix('{').expect("called at a brace");
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest
            .find('=')
            .ok_or_else(|| format!("label without '=' in {s:?}"))?;
        let name = &rest[..eq];
        if !is_label_name(name) || name.starts_with("__") {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or_else(|| format!("label {name} value not quoted"))?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err(format!("unterminated value of label {name}")),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => {
                        return Err(format!(
                            "bad escape {:?} in label {name}",
                            other.map(|o| o.1)
                        ))
                    }
                },
                Some((_, c)) => value.push(c),
            }
        };
        if labels.insert(name.to_owned(), value).is_some() {
            return Err(format!("label {name} repeated"));
        }
        rest = &rest[end + 1..];
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.starts_with('}') {
            return Err(format!("expected ',' or '}}' after label {name}"));
        }
    }
}

/// Does sample `sample` belong to family `family` of type `kind`?
fn belongs(family: &str, kind: &str, sample: &str) -> bool {
    match kind {
        "histogram" => [
            format!("{family}_bucket"),
            format!("{family}_sum"),
            format!("{family}_count"),
        ]
        .contains(&sample.to_string()),
        "summary" => {
            sample == family
                || sample == format!("{family}_sum")
                || sample == format!("{family}_count")
        }
        _ => sample == family,
    }
}

/// Parses a whole text exposition strictly: one HELP and one TYPE at most
/// per family, TYPE before the family's samples, each family in one group,
/// the sample grammar, label escaping, float values, no duplicate series,
/// and consistent histograms.
fn parse_exposition(text: &str) -> Result<Exposition, String> {
    if !text.is_empty() && !text.ends_with('\n') {
        return Err("the exposition does not end with a newline".into());
    }
    let mut families: Vec<Family> = Vec::new();
    let mut current: Option<usize> = None;
    let mut series = BTreeSet::new();
    // Opens the family `name` (or continues it when it is the current one).
    let open = |families: &mut Vec<Family>, current: &mut Option<usize>, name: &str| {
        if let Some(i) = families.iter().position(|f| f.name == name) {
            if *current != Some(i) {
                return Err(format!("family {name} appears in two separate groups"));
            }
            return Ok(i);
        }
        families.push(Family {
            name: name.to_owned(),
            kind: "untyped".into(),
            help: None,
            samples: Vec::new(),
        });
        *current = Some(families.len() - 1);
        Ok(families.len() - 1)
    };
    for (n, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            if !is_metric_name(name) {
                return Err(at(format!("bad metric name {name:?} in HELP")));
            }
            check_help_escapes(help).map_err(at)?;
            let i = open(&mut families, &mut current, name).map_err(at)?;
            if families[i].help.replace(help.to_owned()).is_some() {
                return Err(at(format!("second HELP for {name}")));
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest
                .split_once(' ')
                .ok_or_else(|| at("TYPE without a type".into()))?;
            if !is_metric_name(name) {
                return Err(at(format!("bad metric name {name:?} in TYPE")));
            }
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                return Err(at(format!("unknown type {kind:?}")));
            }
            let i = open(&mut families, &mut current, name).map_err(at)?;
            let f = &mut families[i];
            if !f.samples.is_empty() {
                return Err(at(format!("TYPE for {name} after its samples")));
            }
            if f.kind != "untyped" {
                return Err(at(format!("second TYPE for {name}")));
            }
            f.kind = kind.to_owned();
            continue;
        }
        if line.starts_with('#') {
            continue; // a comment
        }
        // A sample: name [labels] value [timestamp]
        let name_end = line
            .find(['{', ' ', '\t'])
            .ok_or_else(|| at("sample without a value".into()))?;
        let name = &line[..name_end];
        if !is_metric_name(name) {
            return Err(at(format!("bad metric name {name:?}")));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(at)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let mut fields = rest.split([' ', '\t']).filter(|f| !f.is_empty());
        if !rest.starts_with([' ', '\t']) {
            return Err(at("no blank before the value".into()));
        }
        let value = fields
            .next()
            .ok_or_else(|| at("sample without a value".into()))?;
        let value =
            parse_value(value).ok_or_else(|| at(format!("value {value:?} is not a float")))?;
        if let Some(ts) = fields.next() {
            let digits = ts.strip_prefix('-').unwrap_or(ts);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(at(format!("bad timestamp {ts:?}")));
            }
        }
        if fields.next().is_some() {
            return Err(at("trailing fields after the sample".into()));
        }
        let family = match current {
            Some(i) if belongs(&families[i].name, &families[i].kind, name) => i,
            _ => {
                let taken = families
                    .iter()
                    .any(|f| belongs(&f.name, &f.kind, name) || f.name == name);
                if taken {
                    return Err(at(format!("sample {name} outside its family's group")));
                }
                open(&mut families, &mut current, name).map_err(at)?
            }
        };
        if !series.insert((name.to_owned(), labels.clone())) {
            return Err(at(format!("duplicate series {name}{labels:?}")));
        }
        families[family].samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    for f in &families {
        check_family(f)?;
    }
    Ok(Exposition { families })
}

/// Type-specific rules: counters are non-negative, histograms have
/// increasing `le` buckets ending in `+Inf`, cumulative counts, and
/// `_count` equal to the `+Inf` bucket, with a `_sum`.
fn check_family(f: &Family) -> Result<(), String> {
    match f.kind.as_str() {
        "counter" => {
            for s in &f.samples {
                if s.value.is_nan() || s.value < 0.0 {
                    return Err(format!("counter {} = {} {:?}", f.name, s.value, s.labels));
                }
            }
        }
        "histogram" => {
            // One histogram per label set without `le`.
            type Series = Vec<(String, String)>;
            let mut buckets: BTreeMap<Series, Vec<(f64, f64)>> = BTreeMap::new();
            let mut sums: HashMap<Series, f64> = HashMap::new();
            let mut counts: HashMap<Series, f64> = HashMap::new();
            let key = |l: &BTreeMap<String, String>| -> Series {
                l.iter()
                    .filter(|(k, _)| k.as_str() != "le")
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            };
            for s in &f.samples {
                if s.name.ends_with("_bucket") {
                    let le = s
                        .labels
                        .get("le")
                        .ok_or_else(|| format!("{} bucket without le", f.name))?;
                    let le = parse_value(le).ok_or_else(|| format!("{}: le {le:?}", f.name))?;
                    buckets
                        .entry(key(&s.labels))
                        .or_default()
                        .push((le, s.value));
                } else if s.name.ends_with("_sum") {
                    sums.insert(key(&s.labels), s.value);
                } else {
                    counts.insert(key(&s.labels), s.value);
                }
            }
            for (k, bs) in &buckets {
                for w in bs.windows(2) {
                    if w[1].0 <= w[0].0 || w[1].1 < w[0].1 {
                        return Err(format!("{} {k:?}: buckets not increasing: {bs:?}", f.name));
                    }
                }
                let last = bs.last().expect("a bucket");
                if last.0 != f64::INFINITY {
                    return Err(format!("{} {k:?}: no +Inf bucket", f.name));
                }
                if counts.get(k) != Some(&last.1) {
                    return Err(format!(
                        "{} {k:?}: _count {:?} differs from the +Inf bucket {}",
                        f.name,
                        counts.get(k),
                        last.1
                    ));
                }
                if !sums.contains_key(k) {
                    return Err(format!("{} {k:?}: no _sum", f.name));
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// The parser refuses what it must refuse (so a pass means something).
#[test]
fn exposition_parser_is_strict() {
    let good = "# HELP a_total A \\\\ help\\n.\n# TYPE a_total counter\n\
                a_total{x=\"q\\\"uo\\\\te\\n\",y=\"\"} 1\na_total 2.5e3\n\
                # TYPE h histogram\nh_bucket{le=\"0.5\"} 1\nh_bucket{le=\"+Inf\"} 2\n\
                h_sum 0.7\nh_count 2\n# TYPE g gauge\ng -Inf\ng{a=\"b\",} NaN 1700000000000\n";
    let e = parse_exposition(good).unwrap_or_else(|e| panic!("valid text refused: {e}"));
    assert_eq!(
        e.value("a_total", &[("x", "q\"uo\\te\n"), ("y", "")]),
        Some(1.0)
    );
    assert_eq!(e.value("a_total", &[]), Some(2500.0));
    let bad = [
        ("no final newline", "a 1"),
        ("two HELP", "# HELP a x\n# HELP a y\na 1\n"),
        ("two TYPE", "# TYPE a gauge\n# TYPE a gauge\na 1\n"),
        ("TYPE after samples", "a 1\n# TYPE a gauge\n"),
        (
            "split group",
            "# TYPE a gauge\na 1\n# TYPE b gauge\nb 1\na{x=\"1\"} 2\n",
        ),
        ("bad escape", "a{x=\"\\t\"} 1\n"),
        ("unquoted label", "a{x=1} 1\n"),
        ("not a float", "a 1,5\n"),
        ("hex value", "a 0x10\n"),
        ("duplicate series", "a{x=\"1\"} 1\na{x=\"1\"} 2\n"),
        ("duplicate label", "a{x=\"1\",x=\"2\"} 1\n"),
        ("bad name", "1a 1\n"),
        ("reserved label", "a{__x=\"1\"} 1\n"),
        ("trailing junk", "a 1 2 3\n"),
        ("unknown type", "# TYPE a thing\na 1\n"),
        ("negative counter", "# TYPE a_total counter\na_total -1\n"),
        (
            "histogram without +Inf",
            "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n",
        ),
        (
            "histogram count mismatch",
            "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 1\n",
        ),
        ("bad HELP escape", "# HELP a x\\y\na 1\n"),
    ];
    for (label, text) in bad {
        assert!(
            parse_exposition(text).is_err(),
            "{label}: accepted {text:?}"
        );
    }
}

/// `GET /metrics`, parsed strictly; panics with the parse error and the text.
fn scrape(cache: &str) -> Exposition {
    let r = get(cache, "/metrics");
    assert_eq!(r.status, 200, "GET /metrics: {}", r.describe());
    assert!(
        r.header("Content-Type")
            .is_some_and(|t| t.starts_with("text/plain")),
        "GET /metrics: Content-Type {:?}",
        r.header("Content-Type")
    );
    let text = r.text();
    parse_exposition(&text)
        .unwrap_or_else(|e| panic!("/metrics is not valid exposition format: {e}\n{text}"))
}

// ---------------------------------------------------------------------------
// metrics
// ---------------------------------------------------------------------------

/// Two upstreams; skopeo pulls through regcache; `/metrics` moves as it
/// must: a first pull counts blob misses and upstream bytes, a second one
/// hits and cache bytes with no upstream traffic; each worker's series carry
/// its own `upstream="host:port"`; upstream request counters agree with what
/// the fake upstream saw; the page always parses.
#[test]
fn metrics_follow_pulls_per_upstream() {
    let a = FakeRegistry::start();
    let b = FakeRegistry::start();
    let img_a = a.add_image("org/img", "1.0", &[300_000, 20_000]);
    let img_b = b.add_image("library/small", "1", &[50_000]);
    let storage = temp_dir("regcache-storage-");
    let rc = Regcache::start(
        &config_json(&[(&a.url(), &["a.test"]), (&b.url(), &["docker.io"])]),
        &storage.path().join("storage"),
    );
    let cache = rc.addr().to_owned();
    let (ua, ub) = (a.addr(), b.addr());
    let work = temp_dir("regcache-ops-");
    let req = |m: &Exposition, t: &str, r: &str, u: &str| {
        m.count(
            "regcache_requests_total",
            &[("type", t), ("result", r), ("upstream", u)],
        )
    };
    let served = |m: &Exposition, src: &str, u: &str| {
        m.count(
            "regcache_served_bytes_total",
            &[("source", src), ("upstream", u)],
        )
    };
    let upstream_2xx = |m: &Exposition, u: &str| {
        m.count(
            "regcache_upstream_requests_total",
            &[("status", "2xx"), ("upstream", u)],
        )
    };
    let blobs_a = img_a.blob_digests().len() as f64;
    let blobs_b = img_b.blob_digests().len() as f64;
    let bytes_a = blob_bytes(&img_a) as f64;

    let m0 = scrape(&cache);
    for u in [&ua, &ub] {
        assert_eq!(
            m0.value("regcache_worker_up", &[("upstream", u)]),
            Some(1.0),
            "regcache_worker_up{{upstream={u:?}}} at start"
        );
    }

    // Cold pull from a.
    pull_and_check_image(
        &format!("{cache}/a.test/org/img:1.0"),
        &img_a,
        &work.path().join("a-cold"),
    );
    let m1 = scrape(&cache);
    // Blobs fetched ahead (all of this image's are small) may already be
    // stored when the client asks: those requests are hits.
    assert_eq!(
        req(&m1, "blob", "miss", &ua) + req(&m1, "blob", "hit", &ua),
        blobs_a,
        "blob requests after a cold pull"
    );
    assert!(
        req(&m1, "manifest", "miss", &ua) >= 1.0,
        "manifest misses after a cold pull"
    );
    assert_eq!(
        m1.count(
            "registry_proxy_misses_total",
            &[("type", "blob"), ("upstream", &ua)]
        ),
        req(&m1, "blob", "miss", &ua),
        "registry_proxy_misses_total{{type=blob}} after a cold pull"
    );
    assert!(
        served(&m1, "upstream", &ua) + served(&m1, "cache", &ua) >= bytes_a,
        "bytes served {} < blob bytes {bytes_a}",
        served(&m1, "upstream", &ua) + served(&m1, "cache", &ua)
    );
    assert_eq!(
        upstream_2xx(&m1, &ua),
        a.request_count() as f64,
        "regcache_upstream_requests_total{{status=2xx}} vs what upstream a saw\n{}",
        a.describe_requests()
    );
    assert_eq!(
        m1.value("regcache_cache_blobs", &[("upstream", &ua)]),
        Some(blobs_a),
        "regcache_cache_blobs after a cold pull"
    );
    assert!(
        m1.count("regcache_cache_size_bytes", &[("upstream", &ua)]) >= bytes_a,
        "regcache_cache_size_bytes below the blob bytes"
    );
    assert_eq!(
        m1.value("regcache_fills_in_flight", &[("upstream", &ua)]),
        Some(0.0),
        "regcache_fills_in_flight after the pull"
    );
    assert_eq!(
        req(&m1, "blob", "miss", &ub),
        0.0,
        "upstream b moved without a pull"
    );
    assert_eq!(
        served(&m1, "upstream", &ub),
        0.0,
        "upstream b served bytes without a pull"
    );

    // Warm pull from a: hits, cache bytes, no upstream traffic.
    let seen_by_a = a.request_count();
    pull_and_check_image(
        &format!("{cache}/a.test/org/img:1.0"),
        &img_a,
        &work.path().join("a-warm"),
    );
    let m2 = scrape(&cache);
    assert_eq!(
        req(&m2, "blob", "hit", &ua) - req(&m1, "blob", "hit", &ua),
        blobs_a,
        "blob hits of a warm pull"
    );
    assert_eq!(
        req(&m2, "blob", "miss", &ua),
        req(&m1, "blob", "miss", &ua),
        "blob misses moved on a warm pull"
    );
    assert!(
        req(&m2, "manifest", "hit", &ua) >= 1.0,
        "manifest hits after a warm pull"
    );
    assert_eq!(
        req(&m2, "manifest", "miss", &ua),
        req(&m1, "manifest", "miss", &ua),
        "manifest misses moved on a warm pull"
    );
    assert_eq!(
        m2.count(
            "registry_proxy_hits_total",
            &[("type", "blob"), ("upstream", &ua)]
        ),
        req(&m2, "blob", "hit", &ua),
        "registry_proxy_hits_total{{type=blob}} after a warm pull"
    );
    assert_eq!(
        served(&m2, "upstream", &ua),
        served(&m1, "upstream", &ua),
        "bytes from upstream moved on a warm pull"
    );
    assert!(
        served(&m2, "cache", &ua) - served(&m1, "cache", &ua) >= bytes_a,
        "bytes served from cache on a warm pull: {} < {bytes_a}",
        served(&m2, "cache", &ua) - served(&m1, "cache", &ua)
    );
    assert_eq!(a.request_count(), seen_by_a, "{}", a.describe_requests());
    assert_eq!(
        upstream_2xx(&m2, &ua),
        a.request_count() as f64,
        "upstream request counter vs upstream a"
    );
    let blob_requests = req(&m2, "blob", "hit", &ua) + req(&m2, "blob", "miss", &ua);
    assert_eq!(
        m2.value(
            "regcache_request_duration_seconds_count",
            &[("type", "blob"), ("upstream", &ua)]
        ),
        Some(blob_requests),
        "duration histogram count vs blob requests"
    );

    // Pull from b: only b's series move.
    pull_and_check_image(
        &format!("{cache}/small:1"),
        &img_b,
        &work.path().join("b-cold"),
    );
    let m3 = scrape(&cache);
    assert_eq!(
        req(&m3, "blob", "miss", &ub) + req(&m3, "blob", "hit", &ub),
        blobs_b,
        "b: blob requests"
    );
    assert!(
        served(&m3, "upstream", &ub) + served(&m3, "cache", &ub) >= blob_bytes(&img_b) as f64,
        "b: bytes served"
    );
    assert_eq!(
        upstream_2xx(&m3, &ub),
        b.request_count() as f64,
        "b: upstream request counter vs upstream b\n{}",
        b.describe_requests()
    );
    for (t, r) in [("blob", "miss"), ("blob", "hit"), ("manifest", "miss")] {
        assert_eq!(
            req(&m3, t, r, &ua),
            req(&m2, t, r, &ua),
            "a's {t}/{r} moved on a pull from b"
        );
    }

    // Shape: families, types, labels.
    for (family, kind) in [
        ("regcache_requests_total", "counter"),
        ("regcache_served_bytes_total", "counter"),
        ("regcache_upstream_requests_total", "counter"),
        ("regcache_cache_size_bytes", "gauge"),
        ("regcache_cache_blobs", "gauge"),
        ("regcache_fills_in_flight", "gauge"),
        ("regcache_read_ahead_total", "counter"),
        ("regcache_upstream_ratelimit_remaining", "gauge"),
        ("regcache_worker_up", "gauge"),
        ("regcache_request_duration_seconds", "histogram"),
        ("registry_proxy_hits_total", "counter"),
        ("registry_proxy_misses_total", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_cpu_seconds_total", "counter"),
    ] {
        let f = m3
            .family(family)
            .unwrap_or_else(|| panic!("family {family} missing from /metrics"));
        assert_eq!(f.kind, kind, "TYPE of {family}");
        assert!(f.help.is_some(), "{family} has no HELP");
    }
    for s in m3.samples("regcache_requests_total") {
        let keys: Vec<&str> = s.labels.keys().map(String::as_str).collect();
        assert_eq!(keys, ["result", "type", "upstream"], "labels of {s:?}");
        assert!(
            ["manifest", "blob", "tags", "other"].contains(&s.labels["type"].as_str()),
            "type label of {s:?}"
        );
        assert!(
            ["hit", "miss", "revalidated", "stale", "error", "forwarded"]
                .contains(&s.labels["result"].as_str()),
            "result label of {s:?}"
        );
        assert!(
            s.labels["upstream"] == ua || s.labels["upstream"] == ub,
            "upstream label of {s:?}"
        );
    }
    for u in [&ua, &ub] {
        assert!(
            m3.value("regcache_upstream_ratelimit_remaining", &[("upstream", u)])
                .is_some(),
            "regcache_upstream_ratelimit_remaining{{upstream={u:?}}} missing"
        );
    }
    // Process metrics: the supervisor's unlabelled, each worker's labelled.
    for labels in [
        vec![],
        vec![("upstream", ua.as_str())],
        vec![("upstream", ub.as_str())],
    ] {
        assert!(
            m3.value("process_resident_memory_bytes", &labels)
                .is_some_and(|v| v > 0.0),
            "process_resident_memory_bytes{labels:?} missing or zero"
        );
    }
}

/// `X-Cache` says how each manifest and blob answer was made, and the
/// `result` label of `regcache_requests_total` agrees: MISS then HIT; after
/// the tag freshness window (2 s here) REVALIDATED with one upstream HEAD;
/// past it again with the upstream failing, STALE (the cached manifest,
/// still 200).
#[test]
fn x_cache_says_how_each_answer_was_made() {
    let fake = FakeRegistry::start();
    let blob = fake.add_blob("org/img", &random_bytes(40_000));
    let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":2},"layers":[]}"#;
    let digest = fake.add_manifest("org/img", Some("1.0"), support::OCI_MANIFEST, manifest);
    let storage = temp_dir("regcache-storage-");
    let rc = Regcache::start_with_env(
        &config_json(&[(&fake.url(), &["upstream.test"])]),
        &storage.path().join("storage"),
        &[("REGCACHE_TAG_FRESHNESS", "2s")],
    );
    let cache = rc.addr().to_owned();
    let up = fake.addr();
    let tag_path = "/v2/upstream.test/org/img/manifests/1.0";
    let x_cache = |method: &str, path: &str, want: &str| {
        let r = http(&cache, method, path, &[("Accept", MANIFEST_ACCEPT)])
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        assert_eq!(r.status, 200, "{method} {path}: {}", r.describe());
        assert_eq!(
            r.header("X-Cache"),
            Some(want),
            "{method} {path}: X-Cache: {}\n{}",
            r.describe(),
            fake.describe_requests()
        );
        if method == "GET" && path == tag_path {
            assert_eq!(sha256_digest(&r.body), digest, "{path}: manifest bytes");
        }
    };
    x_cache("GET", tag_path, "MISS");
    x_cache("GET", tag_path, "HIT");
    x_cache("HEAD", tag_path, "HIT");
    x_cache(
        "GET",
        &format!("/v2/upstream.test/org/img/manifests/{digest}"),
        "HIT",
    );
    x_cache("GET", &blob.path_via("upstream.test"), "MISS");
    x_cache("GET", &blob.path_via("upstream.test"), "HIT");
    x_cache("HEAD", &blob.path_via("upstream.test"), "HIT");

    std::thread::sleep(Duration::from_millis(2200));
    let mark = fake.request_count();
    x_cache("GET", tag_path, "REVALIDATED");
    let asked: Vec<String> = fake
        .requests_since(mark)
        .iter()
        .map(|r| r.to_string())
        .collect();
    assert_eq!(
        asked,
        ["HEAD /v2/org/img/manifests/1.0"],
        "revalidation: one upstream HEAD"
    );

    fake.set("/v2/org/img/manifests/1.0", Serve::status(500));
    std::thread::sleep(Duration::from_millis(2200));
    x_cache("GET", tag_path, "STALE");

    let m = scrape(&cache);
    let req = |r: &str| {
        m.count(
            "regcache_requests_total",
            &[("type", "manifest"), ("result", r), ("upstream", &up)],
        )
    };
    assert_eq!(req("miss"), 1.0, "manifest misses");
    assert_eq!(req("revalidated"), 1.0, "manifest revalidations");
    assert_eq!(req("stale"), 1.0, "manifests served stale");
    assert!(req("hit") >= 3.0, "manifest hits");
}

// ---------------------------------------------------------------------------
// shutdown
// ---------------------------------------------------------------------------

/// SIGTERM while two large blobs are being filled from a slow upstream (one
/// still read by its client, one whose client left): regcache stops
/// accepting at once, both fills complete and are committed, the client gets
/// every byte, and the exit code is 0.
#[test]
fn sigterm_lets_started_fills_finish() {
    let fake = FakeRegistry::start();
    let read = fake.add_blob("org/img", &random_bytes(8 << 20));
    let left = fake.add_blob("org/img", &random_bytes(6 << 20));
    let gate = Gate::new();
    let _open = OpenOnDrop(gate.clone());
    for b in [&read, &left] {
        fake.set(
            &b.path,
            Serve::ok().slow(256 << 10, ms(10)).pause_at(1 << 20, &gate),
        );
    }
    let storage_parent = temp_dir("regcache-storage-");
    let storage = storage_parent.path().join("storage");
    let mut rc = Regcache::start(&config_json(&[(&fake.url(), &["upstream.test"])]), &storage);
    let cache = rc.addr().to_owned();

    let reader = {
        let (cache, path) = (cache.clone(), read.path_via("upstream.test"));
        std::thread::spawn(move || {
            let mut r =
                http_open(&cache, "GET", &path, &[]).unwrap_or_else(|e| panic!("GET {path}: {e}"));
            let body = r.read_rest();
            (r.status, r.describe(), body)
        })
    };
    let path = left.path_via("upstream.test");
    let mut leaver =
        http_open(&cache, "GET", &path, &[]).unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert_eq!(leaver.status, 200, "GET {path}: {}", leaver.describe());
    assert!(
        gate.wait_reached(2, Duration::from_secs(20)),
        "the two fills did not both reach 1 MiB\n{}",
        fake.describe_requests()
    );
    let _ = leaver.read_some(10_000);
    drop(leaver);

    rc.sigterm();
    let closed = wait_for(Duration::from_secs(10), || {
        (!port_is_open(&cache)).then_some(())
    });
    assert!(
        closed.is_some(),
        "regcache still accepts connections on {cache} 10 s after SIGTERM"
    );
    gate.open();
    let status = rc.wait_exit(Duration::from_secs(25));
    let (code, headers, body) = reader.join().expect("reader thread");
    let status = status.unwrap_or_else(|| {
        panic!(
            "regcache did not exit within 25 s of SIGTERM; log tail:\n{}",
            rc.log_tail(30)
        )
    });
    assert!(
        status.success(),
        "exit status after SIGTERM: {status} (expected 0)"
    );
    assert_eq!(code, 200, "the client reading through SIGTERM: {headers}");
    assert!(
        body.complete(),
        "the client reading through SIGTERM was cut off: {:?} ({} bytes)",
        body.error,
        body.bytes.len()
    );
    assert_eq!(
        sha256_digest(&body.bytes),
        read.digest,
        "the client's bytes"
    );

    let root = upstream_root(&storage, &fake.addr());
    for (what, b) in [("read blob", &read), ("left blob", &left)] {
        let file = blob_file(&root, &b.digest);
        let data = std::fs::read(&file).unwrap_or_else(|e| {
            panic!(
                "{what}: not committed before exit ({}: {e}); log tail:\n{}",
                file.display(),
                rc.log_tail(30)
            )
        });
        assert_eq!(sha256_digest(&data), b.digest, "{what}: committed bytes");
        assert_eq!(fake.count("GET", &b.path), 1, "{what}: upstream GETs");
    }
    assert!(
        tmp_entries(&root).is_empty(),
        "tmp/ after a clean exit: {:?}",
        tmp_entries(&root)
    );
}

/// Only the supervisor is SIGKILLed while a fill is half-way, and a new one
/// starts at once on the same storage: its worker waits for the old worker
/// (which finishes its fill and exits) instead of sharing the root with it;
/// the old worker's commit succeeds, and the new regcache serves the blob
/// from cache.
#[test]
fn a_new_supervisor_on_the_same_storage_waits_for_the_old_worker() {
    let fake = FakeRegistry::start();
    let blob = fake.add_blob("org/img", &random_bytes(2 << 20));
    let gate = Gate::new();
    let _open = OpenOnDrop(gate.clone());
    fake.once(&blob.path, Serve::ok().only("GET").pause_at(1 << 20, &gate));
    let storage_parent = temp_dir("regcache-storage-");
    let storage = storage_parent.path().join("storage");
    let config = config_json(&[(&fake.url(), &["upstream.test"])]);
    let mut old = Regcache::start(&config, &storage);
    let path = blob.path_via("upstream.test");
    let client = http_open(old.addr(), "GET", &path, &[]).unwrap();
    assert_eq!(client.status, 200, "{}", client.describe());
    assert!(
        gate.wait_reached(1, Duration::from_secs(20)),
        "{}",
        fake.describe_requests()
    );
    let old_workers = old.worker_pids();
    kill(Pid::from_raw(old.pid().unwrap()), Signal::SIGKILL).unwrap();
    old.wait_exit(Duration::from_secs(5))
        .expect("the supervisor died");
    drop(client);

    // The old worker drains its fill; let it finish a moment after the new
    // regcache has started (its worker is then waiting for the root).
    let opener = {
        let gate = gate.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1500));
            gate.open();
        })
    };
    let new = Regcache::start(&config, &storage);
    opener.join().unwrap();
    let root = upstream_root(&storage, &fake.addr());
    let data = std::fs::read(blob_file(&root, &blob.digest)).unwrap_or_else(|e| {
        panic!(
            "the old worker's fill was not committed: {e}\n{}",
            new.log_tail(30)
        )
    });
    assert_eq!(sha256_digest(&data), blob.digest);
    assert!(
        wait_for(Duration::from_secs(10), || old_workers
            .iter()
            .all(|p| !is_alive(*p))
            .then_some(()))
        .is_some(),
        "the old worker outlived its fill"
    );
    let r = get(new.addr(), &path);
    assert_eq!(
        (r.status, r.header("X-Cache")),
        (200, Some("HIT")),
        "{}",
        r.describe()
    );
    assert_eq!(
        fake.count("GET", &blob.path),
        1,
        "{}",
        fake.describe_requests()
    );
    assert!(
        new.log_tail(200)
            .contains("another process holds this cache's storage"),
        "the new worker did not wait for the old one:\n{}",
        new.log_tail(40)
    );
}

/// SIGKILL of the whole process group while a fill is half-way: no blob
/// becomes visible, and after a restart on the same storage `tmp/` holds no
/// debris and the blob is fetched afresh.
#[test]
fn sigkill_mid_fill_leaves_nothing_visible() {
    let fake = FakeRegistry::start();
    let blob = fake.add_blob("org/img", &random_bytes(4 << 20));
    let gate = Gate::new();
    let _open = OpenOnDrop(gate.clone());
    fake.once(&blob.path, Serve::ok().only("GET").pause_at(1 << 20, &gate));
    let storage_parent = temp_dir("regcache-storage-");
    let storage = storage_parent.path().join("storage");
    let mut rc = Regcache::start(&config_json(&[(&fake.url(), &["upstream.test"])]), &storage);
    let path = blob.path_via("upstream.test");
    let root = upstream_root(&storage, &fake.addr());

    let client =
        http_open(rc.addr(), "GET", &path, &[]).unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert_eq!(client.status, 200, "GET {path}: {}", client.describe());
    assert!(
        gate.wait_reached(1, Duration::from_secs(20)),
        "the fill did not reach 1 MiB\n{}",
        fake.describe_requests()
    );
    let debris_before_restart = tmp_entries(&root);
    rc.kill();
    drop(client);
    gate.open();

    assert!(
        !blob_file(&root, &blob.digest).exists(),
        "a half-filled blob is visible after SIGKILL"
    );
    for p in walk(&root.join("blobs")) {
        let full = root.join("blobs").join(&p);
        if full.is_file() {
            let data = std::fs::read(&full).unwrap();
            assert_eq!(
                digest_hex(&sha256_digest(&data)),
                p.file_name().unwrap().to_string_lossy(),
                "blob file {} does not hash to its name after SIGKILL",
                full.display()
            );
        }
    }

    rc.restart();
    wait_tmp_empty(
        &root,
        &format!("after a restart following SIGKILL (tmp/ held {debris_before_restart:?} before)"),
    );
    let r = get(rc.addr(), &path);
    assert_eq!(r.status, 200, "GET after the restart: {}", r.describe());
    assert_eq!(
        sha256_digest(&r.body),
        blob.digest,
        "GET after the restart: bytes"
    );
    assert_eq!(
        fake.count("GET", &blob.path),
        2,
        "the blob must be fetched afresh after the restart\n{}",
        fake.describe_requests()
    );
}

// ---------------------------------------------------------------------------
// readiness and healthcheck
// ---------------------------------------------------------------------------

/// `/readyz` and `regcache healthcheck` report a killed worker (503 naming
/// its upstream, exit 1) for as long as it is not back, then 200 / exit 0.
///
/// A bare SIGKILL leaves a window of about the restart back-off (100 ms)
/// that a probe may miss; so the worker's storage root is replaced by a
/// plain file first, which makes every restart fail until the test puts the
/// directory back: the outage lasts exactly as long as the test needs.
#[test]
fn readyz_reports_a_dead_worker_until_it_is_back() {
    let a = FakeRegistry::start();
    let b = FakeRegistry::start();
    let blob_b = b.add_blob("org/b", &random_bytes(50_000));
    let storage_parent = temp_dir("regcache-storage-");
    let storage = storage_parent.path().join("storage");
    let rc = Regcache::start(
        &config_json(&[(&a.url(), &["a.test"]), (&b.url(), &["b.test"])]),
        &storage,
    );
    let cache = rc.addr().to_owned();
    let (ua, ub) = (a.addr(), b.addr());
    let healthcheck = || {
        run_regcache(
            &["healthcheck", "--listen", &cache],
            None,
            Duration::from_secs(15),
        )
    };

    let r = get(&cache, "/readyz");
    assert_eq!(
        r.status,
        200,
        "/readyz with every worker up: {}",
        r.describe()
    );
    assert_eq!(get(&cache, "/healthz").status, 200, "/healthz");
    let hc = healthcheck();
    assert!(
        hc.success(),
        "healthcheck with every worker up: {:?} {}",
        hc.status,
        hc.stderr
    );

    let victim = wait_for(Duration::from_secs(5), || {
        let w: Vec<i32> = rc
            .workers()
            .into_iter()
            .filter(|(_, cmd)| cmd.contains(&ua))
            .map(|(p, _)| p)
            .collect();
        (w.len() == 1).then(|| w[0])
    })
    .unwrap_or_else(|| panic!("no single worker for {ua} among {:?}", rc.workers()));

    let root_a = upstream_root(&storage, &ua);
    let away = storage.join("a-away");
    std::fs::rename(&root_a, &away).unwrap();
    std::fs::write(&root_a, b"not a directory: the worker cannot start").unwrap();
    kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();

    let mut last = String::new();
    let down = wait_for(Duration::from_secs(10), || {
        let r = get(&cache, "/readyz");
        last = r.describe();
        (r.status == 503).then_some(r)
    })
    .unwrap_or_else(|| {
        panic!("/readyz never said 503 after the worker of {ua} was killed; last: {last}")
    });
    // The outage lasts until the storage is back: several probes, same answer.
    for probe in 0..5 {
        let r = if probe == 0 {
            down.clone()
        } else {
            get(&cache, "/readyz")
        };
        assert_eq!(
            r.status,
            503,
            "/readyz probe {probe} during the outage: {}",
            r.describe()
        );
        assert!(
            r.text().contains(&ua),
            "/readyz 503 should name {ua}: {}",
            r.describe()
        );
        assert!(
            !r.text().contains(&ub),
            "/readyz 503 names {ub}, whose worker is fine: {}",
            r.describe()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let hc = healthcheck();
    assert_eq!(
        hc.status.and_then(|s| s.code()),
        Some(1),
        "healthcheck during the outage: stderr {}",
        hc.stderr
    );
    let m = scrape(&cache);
    assert_eq!(
        m.value("regcache_worker_up", &[("upstream", &ua)]),
        Some(0.0),
        "worker_up of {ua} while down"
    );
    assert_eq!(
        m.value("regcache_worker_up", &[("upstream", &ub)]),
        Some(1.0),
        "worker_up of {ub}"
    );
    let r = get(&cache, &blob_b.path_via("b.test"));
    assert_eq!(
        r.status,
        200,
        "the other upstream during the outage: {}",
        r.describe()
    );

    std::fs::remove_file(&root_a).unwrap();
    std::fs::rename(&away, &root_a).unwrap();
    let back = wait_for(Duration::from_secs(30), || {
        let r = get(&cache, "/readyz");
        last = r.describe();
        (r.status == 200).then_some(())
    });
    assert!(
        back.is_some(),
        "/readyz not 200 within 30 s of the worker's storage coming back; last: {last}"
    );
    let hc = healthcheck();
    assert!(
        hc.success(),
        "healthcheck once back: {:?} {}",
        hc.status,
        hc.stderr
    );
    let m = scrape(&cache);
    assert_eq!(
        m.value("regcache_worker_up", &[("upstream", &ua)]),
        Some(1.0),
        "worker_up of {ua} once back"
    );
    assert!(
        m.count("regcache_worker_restarts_total", &[("upstream", &ua)]) >= 1.0,
        "regcache_worker_restarts_total{{upstream={ua:?}}} did not count the restart"
    );
    assert_eq!(
        m.count("regcache_worker_restarts_total", &[("upstream", &ub)]),
        0.0,
        "restarts counted for {ub}"
    );
}

/// The supervisor and every worker share the binary's read-only data (330
/// KiB of vtables and tables in a release build, 1.3 MiB in a debug one)
/// from the page cache. What a process holds as its own copy is its
/// writable statics and the slots the loader fills with libc's addresses:
/// 24 KiB in a release build, 100 in a debug one. A binary whose loader
/// relocates that data (position-independent; see build.rs) copies all of
/// it into every process.
#[test]
fn processes_share_the_binarys_read_only_data() {
    let (a, b) = (FakeRegistry::start(), FakeRegistry::start());
    let storage = temp_dir("regcache-storage-");
    let rc = Regcache::start(
        &config_json(&[(&a.url(), &["a.test"]), (&b.url(), &["b.test"])]),
        storage.path(),
    );
    let pids: Vec<i32> = rc.pid().into_iter().chain(rc.worker_pids()).collect();
    assert_eq!(pids.len(), 3, "supervisor and two workers: {pids:?}");
    for pid in pids {
        let kib = copied_pages_of_binary_kib(pid);
        assert!(
            kib <= 192,
            "process {pid} holds {kib} KiB of the binary's pages as its own copy"
        );
    }
}

/// `regcache healthcheck --listen ADDR`: 0 against a running regcache, 1
/// against a closed port.
#[test]
fn healthcheck_exit_codes() {
    let fake = FakeRegistry::start();
    let storage = temp_dir("regcache-storage-");
    let rc = Regcache::start(
        &config_json(&[(&fake.url(), &["upstream.test"])]),
        &storage.path().join("storage"),
    );
    let ok = run_regcache(
        &["healthcheck", "--listen", rc.addr()],
        None,
        Duration::from_secs(15),
    );
    assert_eq!(
        ok.status.and_then(|s| s.code()),
        Some(0),
        "healthcheck against a running regcache: stderr {}",
        ok.stderr
    );
    let closed = format!("127.0.0.1:{}", free_port());
    let bad = run_regcache(
        &["healthcheck", "--listen", &closed],
        None,
        Duration::from_secs(15),
    );
    assert_eq!(
        bad.status.and_then(|s| s.code()),
        Some(1),
        "healthcheck against a closed port: stderr {}",
        bad.stderr
    );
}

/// Workers fill below the clients they serve (`REGCACHE_NICE`, default
/// 10): every thread, in a session of its own, whose CPU share (autogroup)
/// they set too. The front, and the session it was started in (here the
/// test's, in a shell the user's), keep their priority. 0 leaves the
/// workers as started, in the front's session; a value outside 0-19 stops
/// the start before anything runs.
#[test]
fn workers_run_below_their_clients() {
    let fake = FakeRegistry::start();
    let config = config_json(&[(&fake.url(), &["upstream.test"])]);
    let storage = temp_dir("regcache-storage-");
    let own = *thread_nices("self").iter().max().unwrap();
    let session_nice = |pid: i32| {
        autogroup(&pid.to_string()).map(|a| {
            regcache_worker::priority::autogroup_nice(&a)
                .unwrap_or_else(|| panic!("autogroup line {a:?}"))
        })
    };
    let check = |rc: &Regcache, nice: i32| {
        let front = rc.pid().unwrap();
        let workers = rc.worker_pids();
        assert_eq!(workers.len(), 1, "one worker: {workers:?}");
        let worker = workers[0];
        let nices = thread_nices(&front.to_string());
        assert!(
            nices.iter().all(|n| *n == own),
            "front's threads at {nices:?}, the test at {own}"
        );
        assert_eq!(session_of(&front.to_string()), session_of("self"));
        assert_eq!(
            autogroup(&front.to_string()),
            autogroup("self"),
            "the front's session keeps its share"
        );
        let nices = thread_nices(&worker.to_string());
        assert!(
            nices.iter().all(|n| *n == own.max(nice)),
            "worker's threads at {nices:?}, REGCACHE_NICE {nice}"
        );
        if nice > 0 {
            assert_eq!(
                session_of(&worker.to_string()),
                worker,
                "the worker leads a session of its own"
            );
            // Set from a thread of its own, soon after the start.
            if session_nice(worker).is_some() {
                let set = wait_for(Duration::from_secs(10), || {
                    (session_nice(worker) == Some(nice)).then_some(())
                });
                assert!(
                    set.is_some(),
                    "the worker's session at {:?}",
                    session_nice(worker)
                );
            }
        } else {
            assert_eq!(session_of(&worker.to_string()), session_of("self"));
        }
    };

    check(&Regcache::start(&config, storage.path()), 10);
    check(
        &Regcache::start_with_env(&config, storage.path(), &[("REGCACHE_NICE", "15")]),
        15,
    );
    check(
        &Regcache::start_with_env(&config, storage.path(), &[("REGCACHE_NICE", "0")]),
        0,
    );

    let err = Regcache::try_start_with_env(&config, storage.path(), &[("REGCACHE_NICE", "20")])
        .err()
        .expect("REGCACHE_NICE=20 refused");
    assert!(
        err.contains("REGCACHE_NICE \"20\" is not a nice value"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------
// inventory and catalog
// ---------------------------------------------------------------------------

/// The upstream entry of `/api/v1/cache` (an array, or `{"upstreams": [...]}`)
/// whose `url` is `url`.
fn inventory_entry<'a>(inv: &'a serde_json::Value, url: &str) -> &'a serde_json::Value {
    let list = inv
        .as_array()
        .or_else(|| inv.get("upstreams").and_then(|u| u.as_array()))
        .unwrap_or_else(|| panic!("inventory is not a list of upstreams: {inv}"));
    list.iter()
        .find(|u| u["url"] == url)
        .unwrap_or_else(|| panic!("no upstream with url {url} in the inventory: {inv}"))
}

/// The inventory API and `/v2/_catalog` list exactly what was pulled, named
/// as clients pull it through regcache (alias prefix; plain names for the
/// Docker Hub entry), and `_catalog?n=1` walks every entry via `Link`.
#[test]
fn inventory_and_catalog_list_exactly_what_was_pulled() {
    let a = FakeRegistry::start();
    let hub = FakeRegistry::start();
    let img = a.add_image("org/img", "1.0", &[100_000, 2_000]);
    let other = a.add_image("org/other", "2", &[80_000]);
    let small = hub.add_image("library/small", "1", &[30_000]);
    let app = hub.add_image("team/app", "3", &[40_000]);
    let _never = a.add_image("org/never", "1", &[1_000]);
    let storage = temp_dir("regcache-storage-");
    let rc = Regcache::start(
        &config_json(&[(&a.url(), &["upstream.test"]), (&hub.url(), &["docker.io"])]),
        &storage.path().join("storage"),
    );
    let cache = rc.addr().to_owned();
    let work = temp_dir("regcache-ops-");
    pull_and_check_image(
        &format!("{cache}/upstream.test/org/img:1.0"),
        &img,
        &work.path().join("img"),
    );
    pull_and_check_image(
        &format!("{cache}/upstream.test/org/other@{}", other.manifest_digest),
        &other,
        &work.path().join("other"),
    );
    pull_and_check_image(
        &format!("{cache}/small:1"),
        &small,
        &work.path().join("small"),
    );
    pull_and_check_image(
        &format!("{cache}/team/app:3"),
        &app,
        &work.path().join("app"),
    );
    // Asked for but not there: must not be listed.
    let r = http(
        &cache,
        "GET",
        "/v2/upstream.test/org/missing/manifests/1",
        &[("Accept", MANIFEST_ACCEPT)],
    )
    .unwrap();
    assert_eq!(r.status, 404, "a missing manifest: {}", r.describe());

    let inv = get(&cache, "/api/v1/cache");
    assert_eq!(inv.status, 200, "/api/v1/cache: {}", inv.describe());
    let inv = inv.json();
    let expect = |url: &str, repos: &[(&str, &str, Option<&str>, &ImageParts)]| {
        let entry = inventory_entry(&inv, url);
        let listed = entry["repositories"]
            .as_array()
            .unwrap_or_else(|| panic!("{url}: no repositories list: {entry}"));
        let names: BTreeSet<&str> = listed.iter().filter_map(|r| r["name"].as_str()).collect();
        let want: BTreeSet<&str> = repos.iter().map(|r| r.0).collect();
        assert_eq!(names, want, "{url}: repositories in the inventory: {entry}");
        for (name, pull_name, tag, image) in repos {
            let r = listed.iter().find(|r| r["name"] == *name).unwrap();
            assert_eq!(r["pull"], *pull_name, "{url} {name}: pull name: {r}");
            let tags = r["tags"].as_object().cloned().unwrap_or_default();
            let want_tags: serde_json::Map<String, serde_json::Value> = tag
                .map(|t| (t.to_owned(), image.manifest_digest.clone().into()))
                .into_iter()
                .collect();
            assert_eq!(tags, want_tags, "{url} {name}: tags: {r}");
            assert_eq!(
                r["manifests"],
                serde_json::json!([image.manifest_digest]),
                "{url} {name}: manifests: {r}"
            );
        }
        let images: Vec<&ImageParts> = repos.iter().map(|r| r.3).collect();
        let blobs: usize = images.iter().map(|i| i.blob_digests().len()).sum();
        let bytes: u64 = images.iter().map(|i| blob_bytes(i)).sum();
        assert_eq!(entry["blobs"], blobs, "{url}: blob count: {entry}");
        let got = entry["bytes"].as_u64().unwrap_or(0);
        assert!(
            got >= bytes,
            "{url}: bytes {got} < the blobs' {bytes}: {entry}"
        );
        (blobs as u64, got)
    };
    let (blobs_a, bytes_a) = expect(
        &a.url(),
        &[
            ("org/img", "upstream.test/org/img", Some("1.0"), &img),
            ("org/other", "upstream.test/org/other", None, &other),
        ],
    );
    let (blobs_h, bytes_h) = expect(
        &hub.url(),
        &[
            ("library/small", "library/small", Some("1"), &small),
            ("team/app", "team/app", Some("3"), &app),
        ],
    );

    let summary = get(&cache, "/api/v1/cache/summary");
    assert_eq!(
        summary.status,
        200,
        "/api/v1/cache/summary: {}",
        summary.describe()
    );
    let summary = summary.json();
    for (url, repos, tags, blobs, bytes) in [
        (a.url(), 2, 1, blobs_a, bytes_a),
        (hub.url(), 2, 2, blobs_h, bytes_h),
    ] {
        let e = inventory_entry(&summary, &url);
        assert_eq!(e["repositories"], repos, "summary {url}: {e}");
        assert_eq!(e["tags"], tags, "summary {url}: {e}");
        assert_eq!(e["blobs"], blobs, "summary {url}: {e}");
        assert_eq!(e["bytes"], bytes, "summary {url}: {e}");
    }
    let total = &summary["total"];
    assert_eq!(total["repositories"], 4, "summary total: {summary}");
    assert_eq!(total["tags"], 3, "summary total: {summary}");
    assert_eq!(
        total["blobs"],
        blobs_a + blobs_h,
        "summary total: {summary}"
    );
    assert_eq!(
        total["bytes"],
        bytes_a + bytes_h,
        "summary total: {summary}"
    );

    let all = [
        "library/small",
        "team/app",
        "upstream.test/org/img",
        "upstream.test/org/other",
    ];
    let cat = get(&cache, "/v2/_catalog");
    assert_eq!(cat.status, 200, "/v2/_catalog: {}", cat.describe());
    assert_eq!(
        cat.json()["repositories"],
        serde_json::json!(all),
        "/v2/_catalog (sorted, as pulled through regcache)"
    );
    assert!(
        cat.header("Link").is_none(),
        "/v2/_catalog: Link on the only page"
    );

    // n=1: one entry per page, Link to the next, all entries once.
    let mut walked = Vec::new();
    let mut next = Some("/v2/_catalog?n=1".to_owned());
    while let Some(path) = next.take() {
        assert!(
            walked.len() <= all.len(),
            "catalog paging does not end: {walked:?}"
        );
        let page = get(&cache, &path);
        assert_eq!(page.status, 200, "GET {path}: {}", page.describe());
        let repos = page.json()["repositories"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(repos.len(), 1, "GET {path}: page size: {}", page.describe());
        walked.push(repos[0].as_str().unwrap().to_owned());
        if let Some(link) = page.header("Link") {
            let url = link
                .strip_prefix('<')
                .and_then(|l| l.split_once('>'))
                .filter(|(_, rel)| rel.contains("rel=\"next\""))
                .map(|(u, _)| u.to_owned())
                .unwrap_or_else(|| panic!("GET {path}: Link {link:?} is not <url>; rel=\"next\""));
            assert!(
                url.contains("n=1") && url.contains("last="),
                "Link {link:?}"
            );
            next = Some(url);
        }
    }
    assert_eq!(walked, all, "the catalog walked with n=1 via Link");
}

// ---------------------------------------------------------------------------
// access log
// ---------------------------------------------------------------------------

/// One expected access-log line.
#[derive(Debug)]
struct Expected {
    method: &'static str,
    path: String,
    status: u16,
    bytes: usize,
    upstream: String,
    cache: &'static str,
}

/// Makes a known set of requests through regcache; returns what the access
/// log must say about each, in order.
fn logged_requests(cache: &str, fake: &FakeRegistry) -> Vec<Expected> {
    let blob = fake.add_blob("org/img", &random_bytes(70_000));
    let manifest = fake.add_manifest(
        "org/img",
        Some("1.0"),
        support::OCI_MANIFEST,
        br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":2},"layers":[]}"#,
    );
    let up = fake.addr();
    let mpath = "/v2/upstream.test/org/img/manifests/1.0".to_owned();
    let bpath = blob.path_via("upstream.test");
    let missing = format!("/v2/upstream.test/org/img/blobs/sha256:{}", "cd".repeat(32));
    let plan: Vec<(&'static str, String, &'static str, bool)> = vec![
        // A query no one else sends: the harness probes plain `/v2/`.
        ("GET", "/v2/?access-log-test".into(), "-", false),
        ("GET", mpath.clone(), "MISS", true),
        ("HEAD", mpath.clone(), "HIT", true),
        ("GET", bpath.clone(), "MISS", true),
        ("GET", bpath.clone(), "HIT", true),
        ("HEAD", bpath.clone(), "HIT", true),
        ("GET", missing, "-", true),
        ("GET", "/healthz".into(), "-", false),
    ];
    let mut out = Vec::new();
    for (method, path, cache_result, routed) in plan {
        let r = http(cache, method, &path, &[("Accept", MANIFEST_ACCEPT)])
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        if path == mpath && method == "GET" {
            assert_eq!(sha256_digest(&r.body), manifest, "manifest bytes");
        }
        out.push(Expected {
            method,
            status: r.status,
            bytes: r.body.len(),
            upstream: if routed { up.clone() } else { "-".into() },
            cache: cache_result,
            path,
        });
    }
    assert_eq!(out[6].status, 404, "the missing blob");
    out
}

/// A parsed access-log line: field name -> value as text.
type LogFields = BTreeMap<String, String>;

/// Checks `lines` (access lines, in order) against `expected`: exactly one
/// line per request, fields right.
fn check_access_lines(lines: &[LogFields], expected: &[Expected], log: &str) {
    let mut remaining: Vec<&LogFields> = lines.iter().collect();
    for e in expected {
        let what = format!("{} {}", e.method, e.path);
        let i = remaining
            .iter()
            .position(|l| {
                l.get("method").map(String::as_str) == Some(e.method)
                    && l.get("path") == Some(&e.path)
            })
            .unwrap_or_else(|| panic!("no access-log line for {what}; log:\n{log}"));
        let l = remaining.remove(i);
        let field = |k: &str| {
            l.get(k)
                .unwrap_or_else(|| panic!("{what}: access-log line without {k}: {l:?}"))
                .clone()
        };
        assert_eq!(
            field("status"),
            e.status.to_string(),
            "{what}: status in {l:?}"
        );
        assert_eq!(
            field("bytes"),
            e.bytes.to_string(),
            "{what}: bytes in {l:?}"
        );
        assert_eq!(field("upstream"), e.upstream, "{what}: upstream in {l:?}");
        assert_eq!(field("cache"), e.cache, "{what}: cache in {l:?}");
        let d: f64 = field("duration_ms")
            .parse()
            .unwrap_or_else(|_| panic!("{what}: duration_ms not a number in {l:?}"));
        assert!(d >= 0.0, "{what}: duration_ms {d}");
    }
    let extra: Vec<&LogFields> = remaining
        .into_iter()
        // Not ours: the final /metrics marker, the harness's /v2/ probes.
        .filter(|l| {
            l.get("path")
                .is_some_and(|p| p != "/metrics" && p != "/v2/")
        })
        .collect();
    assert!(
        extra.is_empty(),
        "access-log lines for no request (a request logged twice?): {extra:?}"
    );
}

/// Access-log lines of a text log: `... access: k=v k=v ...`, values bare
/// (operators' parsers and the deployment check expect `upstream=host:port`,
/// not a quoted string).
fn text_access_lines(log: &str) -> Vec<LogFields> {
    log.lines()
        .filter_map(|l| l.split_once(" access: ").map(|(_, rest)| rest))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        })
        .collect()
}

/// Waits until `lines(log)` has at least `n` entries (log lines are written
/// when a response body ends, just after the client saw it).
fn wait_access_lines(
    rc: &Regcache,
    n: usize,
    lines: impl Fn(&str) -> Vec<LogFields>,
) -> (Vec<LogFields>, String) {
    let read =
        || String::from_utf8_lossy(&std::fs::read(rc.log_path()).unwrap_or_default()).into_owned();
    let _ = wait_for(Duration::from_secs(10), || {
        (lines(&read()).len() >= n).then_some(())
    });
    // A last request, logged after all the others, bounds the wait for strays.
    let _ = get(rc.addr(), "/metrics");
    let _ = wait_for(Duration::from_secs(10), || {
        lines(&read())
            .iter()
            .any(|l| l.get("path").map(String::as_str) == Some("/metrics"))
            .then_some(())
    });
    let log = read();
    (lines(&log), log)
}

/// One text access-log line per request, with method, path, upstream,
/// status, bytes, duration_ms and cache.
#[test]
fn access_log_has_one_line_per_request() {
    let fake = FakeRegistry::start();
    let storage = temp_dir("regcache-storage-");
    let rc = Regcache::start(
        &config_json(&[(&fake.url(), &["upstream.test"])]),
        &storage.path().join("storage"),
    );
    let expected = logged_requests(rc.addr(), &fake);
    let (lines, log) = wait_access_lines(&rc, expected.len(), text_access_lines);
    check_access_lines(&lines, &expected, &log);
}

/// With `REGISTRY_LOG_FORMATTER=json` every log line is a JSON object and
/// the access lines carry the same fields.
#[test]
fn access_log_json_lines_parse() {
    let fake = FakeRegistry::start();
    let storage = temp_dir("regcache-storage-");
    let rc = Regcache::start_with_env(
        &config_json(&[(&fake.url(), &["upstream.test"])]),
        &storage.path().join("storage"),
        &[("REGISTRY_LOG_FORMATTER", "json")],
    );
    let json_lines = |log: &str| -> Vec<LogFields> {
        log.lines()
            .filter(|l| !l.starts_with("=== regcache start"))
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "access")
            .map(|v| {
                let fields = v.get("fields").filter(|f| f.is_object()).unwrap_or(&v);
                fields
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| {
                        let text = match v {
                            serde_json::Value::String(s) => s.clone(),
                            other => other.to_string(),
                        };
                        (k.clone(), text)
                    })
                    .collect()
            })
            .collect()
    };
    let expected = logged_requests(rc.addr(), &fake);
    let (lines, log) = wait_access_lines(&rc, expected.len(), json_lines);
    for (n, line) in log.lines().enumerate() {
        if line.starts_with("=== regcache start") {
            continue; // written by the test harness
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line {} is not JSON ({e}): {line:?}", n + 1));
        assert!(
            v.is_object(),
            "log line {} is not a JSON object: {line:?}",
            n + 1
        );
    }
    check_access_lines(&lines, &expected, &log);
}
