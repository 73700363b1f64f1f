//! [`HeldWrites`]: the queue file's writes held in memory until the journal's checkpoint.

use std::collections::BTreeMap;
use std::io;

use redb::StorageBackend;
use redb::backends::FileBackend;

/// The most bytes of held ranges side by side passed to the queue file in one write.
const WRITE_OUT_RUN: usize = 1024 * 1024;

/// Writes held back from the queue file until a checkpoint (or until they outgrow their
/// room): redb rewrites the same pages commit after commit, and the journal holds every
/// one a sync covered, so each page reaches the queue file once per checkpoint instead of
/// once per commit. Ranges never overlap; reads see them over the file's bytes.
#[derive(Debug, Default)]
pub(super) struct HeldWrites {
    by_offset: BTreeMap<u64, Vec<u8>>,
    bytes: usize,
}

impl HeldWrites {
    /// The range held exactly at `offset`, if any.
    pub fn get(&self, offset: u64) -> Option<&[u8]> {
        self.by_offset.get(&offset).map(Vec::as_slice)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Holds `data` for `offset`. Of an older range it covers in part, the rest stays
    /// held, so the ranges held never overlap.
    pub fn hold(&mut self, offset: u64, data: &[u8]) {
        let end = offset + data.len() as u64;
        if let Some(held) = self.by_offset.get_mut(&offset)
            && held.len() == data.len()
        {
            held.copy_from_slice(data);
            return;
        }
        let overlapping: Vec<u64> = self
            .by_offset
            .range(..end)
            .rev()
            .take_while(|(start, held)| **start + held.len() as u64 > offset)
            .map(|(start, _)| *start)
            .collect();
        for start in overlapping {
            let mut held = self.by_offset.remove(&start).expect("listed above");
            self.bytes -= held.len();
            let held_end = start + held.len() as u64;
            if held_end > end {
                let after = held.split_off((end - start) as usize);
                self.bytes += after.len();
                self.by_offset.insert(end, after);
            }
            if start < offset {
                held.truncate((offset - start) as usize);
                self.bytes += held.len();
                self.by_offset.insert(start, held);
            }
        }
        self.bytes += data.len();
        self.by_offset.insert(offset, data.to_vec());
    }

    /// Lays the held ranges over `out`, which holds the file's bytes at `offset`.
    pub fn overlay(&self, offset: u64, out: &mut [u8]) {
        let end = offset + out.len() as u64;
        for (start, held) in self
            .by_offset
            .range(..end)
            .rev()
            .take_while(|(start, held)| **start + held.len() as u64 > offset)
        {
            let from = offset.max(*start);
            let to = end.min(start + held.len() as u64);
            out[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&held[(from - start) as usize..(to - start) as usize]);
        }
    }

    /// Forgets what lies at or past `len`: the file was cut there.
    pub fn truncate(&mut self, len: u64) {
        let cut: Vec<u64> = self
            .by_offset
            .range(..)
            .rev()
            .take_while(|(start, held)| **start + held.len() as u64 > len)
            .map(|(start, _)| *start)
            .collect();
        for start in cut {
            let held = self.by_offset.get_mut(&start).expect("listed above");
            let keep = len.saturating_sub(start) as usize;
            self.bytes -= held.len() - keep;
            held.truncate(keep);
            if keep == 0 {
                self.by_offset.remove(&start);
            }
        }
    }

    /// Passes every held write to the file. One that fails stays held, with those after it.
    /// Ranges side by side go in one write, up to [`WRITE_OUT_RUN`] bytes.
    pub fn write_out(&mut self, file: &FileBackend) -> io::Result<()> {
        let mut run = Vec::new();
        while let Some((&start, _)) = self.by_offset.first_key_value() {
            run.clear();
            let mut ranges = 0;
            for (&at, held) in self.by_offset.range(start..) {
                if at != start + run.len() as u64 || run.len() >= WRITE_OUT_RUN {
                    break;
                }
                run.extend_from_slice(held);
                ranges += 1;
            }
            file.write(start, &run)?;
            for _ in 0..ranges {
                let (_, held) = self.by_offset.pop_first().expect("written above");
                self.bytes -= held.len();
            }
        }
        Ok(())
    }
}
