//! Following a fill: how the front serves a blob a worker is still fetching
//! without relaying its bytes.
//!
//! The front asks for a blob with [`FOLLOW`]. A worker whose answer is a
//! fill in flight then sends the response's status and headers as usual,
//! but names the fill's spool file ([`SPOOL`], a file name in the store's
//! spool directory, which the front can read) and moves the length to
//! [`LENGTH`]; its body is not the blob but a line per step of progress:
//! `N` (bytes `..N` of the blob may be read), and `N end` (nothing more
//! comes for this answer). The last byte of a fill is only readable once
//! its digest checked out, and a fill that fails ends the body with an
//! error, so the front's client sees exactly what a relayed answer would
//! show. Any other answer (a stored blob, one served uncached) is relayed.

/// Asked by the front (removed from every client request).
pub const FOLLOW: &str = "x-regcache-follow";
/// The spool file of a followed fill.
pub const SPOOL: &str = "x-regcache-spool";
/// The `Content-Length` the followed answer stands for.
pub const LENGTH: &str = "x-regcache-length";

/// One line of a followed fill's progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Bytes of the blob before this offset may be read.
    pub readable: u64,
    /// Nothing more will become readable for this answer.
    pub end: bool,
}

impl Step {
    pub fn encode(self) -> String {
        if self.end {
            format!("{} end\n", self.readable)
        } else {
            format!("{}\n", self.readable)
        }
    }
}

/// Splits whole lines off `buf` (a partial last line stays for the next
/// chunk). `None`: a line that is not a step, i.e. not a worker's answer.
pub fn parse(buf: &mut Vec<u8>) -> Option<Vec<Step>> {
    let mut steps = Vec::new();
    while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
        let line: Vec<u8> = buf.drain(..=nl).collect();
        let line = std::str::from_utf8(&line[..nl]).ok()?;
        let (number, end) = match line.strip_suffix(" end") {
            Some(n) => (n, true),
            None => (line, false),
        };
        steps.push(Step {
            readable: number.parse().ok()?,
            end,
        });
    }
    // A line is a few digits; anything longer is not progress.
    (buf.len() <= 32).then_some(steps)
}

/// A spool file name a worker may name: `spool-` and letters or digits,
/// so that no name leaves the spool directory.
pub fn valid_spool_name(name: &str) -> bool {
    name.strip_prefix("spool-").is_some_and(|rest| {
        !rest.is_empty() && rest.len() <= 64 && rest.bytes().all(|b| b.is_ascii_alphanumeric())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_round_trip_across_chunk_boundaries() {
        let sent = [
            Step {
                readable: 65536,
                end: false,
            },
            Step {
                readable: 1 << 40,
                end: true,
            },
        ];
        let wire: String = sent.iter().map(|s| s.encode()).collect();
        let mut buf = Vec::new();
        let mut got = Vec::new();
        for chunk in wire.as_bytes().chunks(3) {
            buf.extend_from_slice(chunk);
            got.extend(parse(&mut buf).unwrap());
        }
        assert_eq!(got, sent);
        assert!(buf.is_empty());
    }

    #[test]
    fn garbage_is_not_progress() {
        assert_eq!(parse(&mut b"12x\n".to_vec()), None);
        assert_eq!(parse(&mut b"-1\n".to_vec()), None);
        assert_eq!(parse(&mut vec![b'1'; 40]), None);
        assert_eq!(parse(&mut b"12".to_vec()), Some(vec![]));
    }

    #[test]
    fn spool_names_stay_in_their_directory() {
        assert!(valid_spool_name("spool-AbC123xyz789"));
        for bad in [
            "spool-",
            "spool-../x",
            "../spool-a",
            "spool-a/b",
            "blob",
            "spool-a.b",
        ] {
            assert!(!valid_spool_name(bad), "{bad}");
        }
    }
}
