//! Buffers for reading blob files, bounded process-wide. A lone client
//! reads 512 KiB at a time (the fastest here); many clients share the same
//! few MiB, each always allowed 64 KiB, so that no read waits for room and
//! 16 clients of one blob hold about 2 MiB of buffers, not 16 × 1 MiB.

use bytes::Bytes;
use tokio::sync::{Semaphore, SemaphorePermit};

/// What every read may have, and the unit of the budget.
const UNIT: u64 = 64 << 10;
/// The largest read.
pub const LARGE: u64 = 512 << 10;
/// The largest read of a file still being written.
const FOLLOWING: u64 = 128 << 10;
/// The sizes tried, largest first, before falling back to [`UNIT`].
const SIZES: [u64; 2] = [LARGE, FOLLOWING];

/// Units beyond each read's first: four large reads at once.
static READS: Budget = Budget(Semaphore::const_new(4 * (LARGE / UNIT - 1) as usize));

struct Budget(Semaphore);

/// Room for one read, given back when the bytes read into it are dropped
/// (after they were sent).
pub struct ReadBuf {
    len: usize,
    room: Option<SemaphorePermit<'static>>,
}

impl ReadBuf {
    /// Room for up to `want` bytes: as much as the budget has now, at most
    /// [`LARGE`], at least 64 KiB (or `want`).
    pub fn sized(want: u64) -> ReadBuf {
        READS.sized(want, LARGE)
    }

    /// Room to read a file still being written (a fill's spool): its bytes
    /// come no faster than the fill, so a large read only holds memory.
    pub fn following(want: u64) -> ReadBuf {
        READS.sized(want, FOLLOWING)
    }

    pub fn size(&self) -> usize {
        self.len
    }

    /// `buf`, read into this room, as bytes that hold the room until dropped.
    pub fn into_bytes(self, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Chunk {
            buf,
            _room: self.room,
        })
    }
}

impl Budget {
    fn sized(&'static self, want: u64, most: u64) -> ReadBuf {
        for size in SIZES.into_iter().filter(|&s| s <= most) {
            let len = want.min(size);
            if len <= UNIT {
                break;
            }
            let units = (len.div_ceil(UNIT) - 1) as u32;
            if let Ok(room) = self.0.try_acquire_many(units) {
                return ReadBuf {
                    len: len as usize,
                    room: Some(room),
                };
            }
        }
        ReadBuf {
            len: want.min(UNIT) as usize,
            room: None,
        }
    }
}

struct Chunk {
    buf: Vec<u8>,
    _room: Option<SemaphorePermit<'static>>,
}

impl AsRef<[u8]> for Chunk {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_share_the_budget_and_give_it_back_when_sent() {
        let budget: &'static Budget = Box::leak(Box::new(Budget(Semaphore::new(28))));
        let sized = |want| budget.sized(want, LARGE);
        let held: Vec<Bytes> = (0..4)
            .map(|_| {
                let room = sized(10 << 20);
                assert_eq!(room.size() as u64, LARGE);
                room.into_bytes(vec![0; 1])
            })
            .collect();
        // The budget is taken: everyone may still read 64 KiB.
        assert_eq!(sized(10 << 20).size() as u64, UNIT);
        // Small reads never take from it, nor read more than wanted.
        assert_eq!(sized(1000).size(), 1000);
        // Sent, the bytes give their room back.
        drop(held);
        let mut rooms: Vec<ReadBuf> = (0..3).map(|_| sized(LARGE)).collect();
        assert!(rooms.iter().all(|r| r.size() as u64 == LARGE));
        rooms.push(sized(300 << 10));
        assert_eq!(rooms[3].size(), 300 << 10);
        // Too little left for a large read: a middle one.
        assert_eq!(sized(LARGE).size(), 128 << 10);
        // A growing file is never read large.
        drop(rooms);
        assert_eq!(budget.sized(LARGE, FOLLOWING).size() as u64, FOLLOWING);
    }
}
