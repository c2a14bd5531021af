//! The log writer: standard error, in batches on the connection threads.
//!
//! A `write` per access-log line was a tenth of a manifest hit's cost, and
//! the stderr lock one more hand-over between threads. A connection thread
//! ([`crate::cores`]) instead gathers its lines and writes them at once
//! before it sleeps, or when [`LIMIT`] bytes are waiting; an idle cache
//! therefore logs each request as it ends, and a busy one a few milliseconds
//! later. Lines gathered are lost only if the process is killed outright.
//! Every other thread writes each line as it comes.

use std::cell::RefCell;
use std::io::{self, Write};

use tracing_subscriber::fmt::MakeWriter;

/// Bytes gathered before they are written anyway (a hundred lines or so).
pub const LIMIT: usize = 16 << 10;

thread_local! {
    static GATHERED: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

/// Makes this thread gather its lines until [`flush`].
pub fn gather() {
    GATHERED.with(|g| *g.borrow_mut() = Some(Vec::with_capacity(LIMIT)));
}

/// Writes the lines this thread gathered.
pub fn flush() {
    GATHERED.with(|g| {
        if let Some(buf) = g.borrow_mut().as_mut() {
            write_out(buf, &mut io::stderr());
        }
    });
}

/// Adds `data` to the gathered `buf`, written to `out` at the limit.
fn add(buf: &mut Vec<u8>, data: &[u8], out: &mut impl Write) {
    buf.extend_from_slice(data);
    if buf.len() >= LIMIT {
        write_out(buf, out);
    }
}

fn write_out(buf: &mut Vec<u8>, out: &mut impl Write) {
    if !buf.is_empty() {
        // Nowhere to report a failed log write; the lines are dropped.
        let _ = out.write_all(buf);
        buf.clear();
    }
}

/// The [`MakeWriter`] of every log line.
#[derive(Clone, Copy, Default)]
pub struct Stderr;

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = Stderr;

    fn make_writer(&'a self) -> Stderr {
        Stderr
    }
}

impl Write for Stderr {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        GATHERED.with(|g| match g.borrow_mut().as_mut() {
            Some(buf) => {
                add(buf, data, &mut io::stderr());
                Ok(data.len())
            }
            None => io::stderr().write(data),
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathered_lines_go_out_whole_at_the_limit() {
        let (mut buf, mut out) = (Vec::new(), Vec::new());
        add(&mut buf, b"one line\n", &mut out);
        assert!(out.is_empty(), "held");
        let line = [b'x'; 1000];
        while out.is_empty() {
            add(&mut buf, &line, &mut out);
        }
        assert!(buf.is_empty());
        assert!(out.len() >= LIMIT && out.starts_with(b"one line\nxxx"));
        write_out(&mut buf, &mut out);
        assert!(out.len() < LIMIT + line.len(), "nothing more to write");
    }

    #[test]
    fn only_threads_that_gather_hold_lines() {
        std::thread::spawn(|| {
            let held = || GATHERED.with(|g| g.borrow().as_ref().map(Vec::len));
            Stderr.write_all(b"").unwrap();
            assert_eq!(held(), None);
            gather();
            Stderr.write_all(b"").unwrap();
            assert_eq!(held(), Some(0));
        })
        .join()
        .unwrap();
    }
}
