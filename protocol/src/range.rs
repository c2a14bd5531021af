//! The single-range subset of HTTP `Range` that registry clients send
//! (`bytes=N-` to resume, `bytes=a-b` for parallel chunks, `bytes=-n`).

/// A satisfiable range, `start..end` (end exclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

/// What to do with a request's `Range` header given the blob size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// No (usable) range: send the whole blob with 200.
    Full,
    /// Send this part with 206.
    Partial(ByteRange),
    /// 416 with `Content-Range: bytes */size`.
    Unsatisfiable,
}

/// Plans a response for `header` against a blob of `size` bytes (unknown
/// while an upstream fill sent no length). Multiple ranges, other units and
/// malformed values are ignored, as RFC 9110 allows, and served in full.
pub fn plan(header: Option<&str>, size: Option<u64>) -> Plan {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Plan::Full;
    };
    if spec.contains(',') {
        return Plan::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Plan::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    let parse = |s: &str| s.parse::<u64>().ok();
    // Unknown length (an upstream fill without Content-Length): a 206 needs
    // Content-Range, which needs the length, so send everything with 200.
    let Some(size) = size else {
        return Plan::Full;
    };
    let range = match (a.is_empty(), parse(a), parse(b)) {
        (true, _, Some(n)) if n > 0 => ByteRange {
            start: size.saturating_sub(n),
            end: size,
        },
        (true, _, _) => {
            return if b == "0" {
                Plan::Unsatisfiable
            } else {
                Plan::Full
            }
        }
        (false, Some(start), None) if b.is_empty() => ByteRange { start, end: size },
        (false, Some(start), Some(last)) if last >= start => ByteRange {
            start,
            end: last.saturating_add(1).min(size),
        },
        _ => return Plan::Full,
    };
    if range.start >= size {
        return Plan::Unsatisfiable;
    }
    Plan::Partial(range)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(start: u64, end: u64) -> Plan {
        Plan::Partial(ByteRange { start, end })
    }

    #[test]
    fn plans() {
        let cases: &[(Option<&str>, Option<u64>, Plan)] = &[
            (None, Some(10), Plan::Full),
            (Some("bytes=0-"), Some(10), p(0, 10)),
            (Some("bytes=4-"), Some(10), p(4, 10)),
            (Some("bytes=2-5"), Some(10), p(2, 6)),
            (Some("bytes=2-50"), Some(10), p(2, 10)),
            (Some("bytes=-3"), Some(10), p(7, 10)),
            (Some("bytes=-30"), Some(10), p(0, 10)),
            (Some("bytes=10-"), Some(10), Plan::Unsatisfiable),
            (Some("bytes=-0"), Some(10), Plan::Unsatisfiable),
            (Some("bytes=5-2"), Some(10), Plan::Full),
            (Some("bytes=0-1,4-5"), Some(10), Plan::Full),
            (Some("items=0-1"), Some(10), Plan::Full),
            (Some("bytes=x-"), Some(10), Plan::Full),
            (Some("bytes=3-"), None, Plan::Full),
            (Some("bytes=3-4"), None, Plan::Full),
            (Some("bytes=-3"), None, Plan::Full),
        ];
        for (h, size, want) in cases {
            assert_eq!(plan(*h, *size), *want, "{h:?} of {size:?}");
        }
    }
}
