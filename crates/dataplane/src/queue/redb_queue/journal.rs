//! [`JournaledFile`]: the storage under the queue's redb file, which makes a commit durable
//! with one sequential write instead of a sync of pages scattered over the file.
//!
//! redb writes a commit's pages wherever its allocator finds room, all over the file, and
//! then syncs the file. The sync sends each scattered page to the disk as a request of its
//! own: 29 pages spread over 6 MiB took 0.36 ms to sync on the benchmark's disk, the same
//! bytes in one run 0.08 ms (BENCHMARKS.md, "A journal in front of the queue file"). So
//! the pages a commit writes go to the queue file as before (unsynced) *and* are appended,
//! side by side, to `<file>.journal`, and only the journal is synced per commit. The queue
//! file is synced at a checkpoint: when the journal is full, and when the file is closed.
//!
//! Opening applies the journal's groups to the queue file before redb reads it. A group is
//! every write (and length change) between two syncs, so after a crash the queue file holds
//! every write that a finished sync covered, and any later ones only in part: the states a
//! crash leaves without the journal too, which redb's commit checksums already handle.
//!
//! Layout: a header `[magic 8][generation 8][crc 4]` in the first [`HEADER_BYTES`], then
//! groups `[generation 8][body length 8][body][crc 4]`, the crc (CRC-32) over everything
//! before it in the group. A body is entries `[offset 8][length 8][bytes]`; offset
//! [`SET_LEN`] is a length change. Replay applies the groups of the header's generation up
//! to the first that does not check: a torn last group was never acknowledged (its sync had
//! not returned). Each checkpoint starts a random generation, so whatever older groups
//! remain past the end are never taken for new ones.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use redb::StorageBackend;
use redb::backends::FileBackend;

const MAGIC: &[u8; 8] = b"WOJRNL01";
/// The header's room; groups start after it.
const HEADER_BYTES: u64 = 4096;
/// An entry's offset that means "set the file's length to the entry's length".
const SET_LEN: u64 = u64::MAX;
/// A group's generation and body length.
const GROUP_HEAD: usize = 16;
/// The open group's buffer keeps at most this much room between commits: a large commit
/// (a purge, a burst) does not hold its size in memory afterwards.
const GROUP_ROOM_KEPT: usize = 1024 * 1024;

/// The journal's path beside the queue file.
pub(super) fn journal_path(queue_file: &Path) -> PathBuf {
    let mut name = queue_file.as_os_str().to_owned();
    name.push(".journal");
    PathBuf::from(name)
}

/// The queue file, journaled: see the module's documentation.
#[derive(Debug)]
pub(super) struct JournaledFile {
    file: FileBackend,
    journal: File,
    /// Bytes of journal before a checkpoint: the header and the groups together.
    capacity: u64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    generation: u64,
    /// Where the next group goes.
    end: u64,
    /// The open group: its head (filled in at the sync), then its entries.
    group: Vec<u8>,
    /// The open group outgrew the journal: the next sync is a checkpoint.
    overflowed: bool,
}

impl JournaledFile {
    /// Opens (or creates) `path` and its journal, and applies what the journal holds. The
    /// queue file is locked first, so a second process gets redb's "already open" error
    /// before the journal is touched.
    pub fn open(path: &Path, capacity: u64) -> Result<Self, redb::DatabaseError> {
        let queue_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let file = FileBackend::new(queue_file)?;
        let journal_path = journal_path(path);
        let created = !journal_path.exists();
        let journal = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&journal_path)?;
        if created && let Some(dir) = path.parent() {
            // The journal's name is durable before anything relies on it.
            File::open(if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            })?
            .sync_all()?;
        }
        if replay(&file, &journal)? > 0 {
            file.sync_data()?;
        }
        let mut state = State {
            generation: 0,
            end: HEADER_BYTES,
            group: Vec::new(),
            overflowed: false,
        };
        start_generation(&journal, &mut state)?;
        Ok(Self {
            file,
            journal,
            capacity: capacity.max(2 * HEADER_BYTES),
            state: Mutex::new(state),
        })
    }

    fn state(&self) -> io::Result<std::sync::MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| io::Error::other("journal state poisoned"))
    }

    /// Syncs the queue file, then starts an empty generation: everything written so far is
    /// in the queue file, so nothing in the journal needs applying any more.
    fn checkpoint(&self, state: &mut State) -> io::Result<()> {
        self.file.sync_data()?;
        start_generation(&self.journal, state)
    }
}

/// Writes a fresh header of a new random generation and syncs it; the open group restarts.
fn start_generation(journal: &File, state: &mut State) -> io::Result<()> {
    let mut generation = rand::random::<u64>();
    if generation == state.generation {
        generation = generation.wrapping_add(1);
    }
    let mut header = Vec::with_capacity(20);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&generation.to_le_bytes());
    header.extend_from_slice(&crc32(&header).to_le_bytes());
    journal.write_all_at(&header, 0)?;
    journal.sync_data()?;
    state.generation = generation;
    state.end = HEADER_BYTES;
    state.overflowed = false;
    state.group.clear();
    Ok(())
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(bytes);
    h.finalize()
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// Applies the journal's valid groups to `file`, in order; the number applied.
fn replay(file: &FileBackend, journal: &File) -> io::Result<u64> {
    let len = journal.metadata()?.len();
    let mut header = [0u8; 20];
    if len < HEADER_BYTES || journal.read_exact_at(&mut header, 0).is_err() {
        return Ok(0);
    }
    let crc = u32::from_le_bytes(header[16..20].try_into().expect("4 bytes"));
    if &header[..8] != MAGIC || crc != crc32(&header[..16]) {
        // A torn header: its checkpoint had synced the queue file before writing it.
        return Ok(0);
    }
    let generation = u64_at(&header, 8).expect("8 bytes");
    let mut at = HEADER_BYTES;
    let mut applied = 0;
    let mut head = [0u8; GROUP_HEAD];
    while at + GROUP_HEAD as u64 + 4 <= len {
        journal.read_exact_at(&mut head, at)?;
        let body_len = u64_at(&head, 8).expect("8 bytes");
        if u64_at(&head, 0) != Some(generation) || body_len > len - at - GROUP_HEAD as u64 - 4 {
            break;
        }
        let mut group = vec![0u8; GROUP_HEAD + body_len as usize + 4];
        journal.read_exact_at(&mut group, at)?;
        let (checked, crc) = group.split_at(group.len() - 4);
        if crc32(checked) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            break;
        }
        apply(file, &checked[GROUP_HEAD..])?;
        applied += 1;
        at += group.len() as u64;
    }
    Ok(applied)
}

/// Applies one group's entries to `file`.
fn apply(file: &FileBackend, mut body: &[u8]) -> io::Result<()> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "a journal entry is cut short");
    while !body.is_empty() {
        let offset = u64_at(body, 0).ok_or_else(bad)?;
        let length = u64_at(body, 8).ok_or_else(bad)?;
        body = &body[16..];
        if offset == SET_LEN {
            file.set_len(length)?;
            continue;
        }
        let bytes = body.get(..length as usize).ok_or_else(bad)?;
        file.write(offset, bytes)?;
        body = &body[length as usize..];
    }
    Ok(())
}

impl State {
    /// Adds an entry to the open group, unless the group outgrew the journal already.
    fn record(&mut self, offset: u64, length: u64, bytes: &[u8], capacity: u64) {
        if self.overflowed {
            return;
        }
        if self.group.is_empty() {
            self.group.resize(GROUP_HEAD, 0);
        }
        if (self.group.len() + 16 + bytes.len()) as u64 > capacity {
            // A commit larger than the journal (an upgrade pass, a large purge): it is
            // made durable by a checkpoint instead.
            self.overflowed = true;
            self.group = Vec::new();
            return;
        }
        self.group.extend_from_slice(&offset.to_le_bytes());
        self.group.extend_from_slice(&length.to_le_bytes());
        self.group.extend_from_slice(bytes);
    }
}

impl StorageBackend for JournaledFile {
    fn len(&self) -> io::Result<u64> {
        self.file.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.file.read(offset, out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut state = self.state()?;
        state.record(SET_LEN, len, &[], self.capacity);
        self.file.set_len(len)
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut state = self.state()?;
        state.record(offset, data.len() as u64, data, self.capacity);
        self.file.write(offset, data)
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut state = self.state()?;
        let state = &mut *state;
        if state.overflowed {
            return self.checkpoint(state);
        }
        if state.group.is_empty() {
            return Ok(());
        }
        let body_len = (state.group.len() - GROUP_HEAD) as u64;
        let total = state.group.len() as u64 + 4;
        if state.end + total > self.capacity {
            return self.checkpoint(state);
        }
        state.group[..8].copy_from_slice(&state.generation.to_le_bytes());
        state.group[8..16].copy_from_slice(&body_len.to_le_bytes());
        let crc = crc32(&state.group);
        state.group.extend_from_slice(&crc.to_le_bytes());
        self.journal.write_all_at(&state.group, state.end)?;
        self.journal.sync_data()?;
        state.end += total;
        state.group.clear();
        state.group.shrink_to(GROUP_ROOM_KEPT);
        Ok(())
    }

    fn close(&self) -> io::Result<()> {
        // Without the checkpoint (a full disk) the next open replays the journal instead.
        let checkpoint = self
            .state()
            .and_then(|mut state| self.checkpoint(&mut state));
        self.file.close()?;
        checkpoint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 4096;

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; PAGE]
    }

    fn read_page(path: &Path, n: u64) -> Vec<u8> {
        let mut out = page(0);
        File::open(path)
            .unwrap()
            .read_exact_at(&mut out, n * PAGE as u64)
            .unwrap();
        out
    }

    /// What a power cut does to writes no sync covered: the disk never got them.
    fn lose_unsynced(path: &Path, n: u64, stale: u8) {
        let f = OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(&page(stale), n * PAGE as u64).unwrap();
    }

    /// A journaled file in a fresh directory, the journal `capacity` bytes.
    fn fresh(capacity: u64) -> (tempfile::TempDir, PathBuf, JournaledFile) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.redb");
        let file = JournaledFile::open(&path, capacity).unwrap();
        (dir, path, file)
    }

    /// Stands for a crash: the backend is dropped without `close`, so no checkpoint runs.
    fn crash(j: JournaledFile) {
        drop(j);
    }

    #[test]
    fn synced_writes_lost_from_the_queue_file_come_back_from_the_journal() {
        let (_dir, path, j) = fresh(1 << 20);
        j.set_len(4 * PAGE as u64).unwrap();
        j.write(0, &page(1)).unwrap();
        j.write(2 * PAGE as u64, &page(2)).unwrap();
        j.sync_data().unwrap();
        j.write(PAGE as u64, &page(3)).unwrap();
        j.write(2 * PAGE as u64, &page(4)).unwrap();
        j.sync_data().unwrap();
        crash(j);
        for (n, stale) in [(0, 0), (1, 0), (2, 9)] {
            lose_unsynced(&path, n, stale);
        }

        let j = JournaledFile::open(&path, 1 << 20).unwrap();
        assert_eq!(j.len().unwrap(), 4 * PAGE as u64);
        assert_eq!(read_page(&path, 0), page(1));
        assert_eq!(read_page(&path, 1), page(3));
        assert_eq!(
            read_page(&path, 2),
            page(4),
            "the later of two synced images wins"
        );
        j.close().unwrap();
    }

    #[test]
    fn a_torn_last_group_is_left_out_and_the_groups_before_it_are_applied() {
        let (_dir, path, j) = fresh(1 << 20);
        j.write(0, &page(1)).unwrap();
        j.sync_data().unwrap();
        j.write(PAGE as u64, &page(2)).unwrap();
        j.sync_data().unwrap();
        crash(j);
        // The second group's last bytes never reached the disk.
        let journal = OpenOptions::new()
            .write(true)
            .open(journal_path(&path))
            .unwrap();
        let len = journal.metadata().unwrap().len();
        journal.write_all_at(&[0xFF; 8], len - 8).unwrap();
        lose_unsynced(&path, 0, 7);
        lose_unsynced(&path, 1, 7);

        let j = JournaledFile::open(&path, 1 << 20).unwrap();
        assert_eq!(read_page(&path, 0), page(1));
        assert_eq!(
            read_page(&path, 1),
            page(7),
            "a group that does not check is not applied"
        );
        j.close().unwrap();
    }

    #[test]
    fn after_a_checkpoint_older_groups_are_never_applied() {
        // Room for the header and two one-page groups: the third sync is a checkpoint.
        let capacity = HEADER_BYTES + 2 * (PAGE as u64 + 40);
        let (_dir, path, j) = fresh(capacity);
        for fill in 1..=3 {
            j.write(0, &page(fill)).unwrap();
            j.sync_data().unwrap();
        }
        j.write(PAGE as u64, &page(4)).unwrap();
        j.sync_data().unwrap();
        crash(j);
        // The checkpoint synced page 0 (fill 3); page 1 is only in the new generation.
        lose_unsynced(&path, 1, 0);

        let j = JournaledFile::open(&path, capacity).unwrap();
        assert_eq!(
            read_page(&path, 0),
            page(3),
            "the older generation's images of page 0 (1, 2) stay unapplied"
        );
        assert_eq!(read_page(&path, 1), page(4));
        j.close().unwrap();
    }

    #[test]
    fn a_commit_larger_than_the_journal_is_made_durable_by_a_checkpoint() {
        let capacity = HEADER_BYTES + 2 * PAGE as u64;
        let (_dir, path, j) = fresh(capacity);
        for n in 0..4 {
            j.write(n * PAGE as u64, &page(n as u8 + 1)).unwrap();
        }
        j.sync_data().unwrap();
        let journal_len = std::fs::metadata(journal_path(&path)).unwrap().len();
        assert!(
            journal_len <= capacity,
            "nothing of the large commit went to the journal ({journal_len} bytes)"
        );
        j.write(0, &page(9)).unwrap();
        j.sync_data().unwrap();
        crash(j);
        lose_unsynced(&path, 0, 0);

        let j = JournaledFile::open(&path, capacity).unwrap();
        assert_eq!(read_page(&path, 0), page(9));
        assert_eq!(read_page(&path, 3), page(4));
        j.close().unwrap();
    }

    #[test]
    fn a_clean_close_leaves_nothing_to_replay() {
        let (_dir, path, j) = fresh(1 << 20);
        j.write(0, &page(1)).unwrap();
        j.sync_data().unwrap();
        j.close().unwrap();
        drop(j);
        // Written after the close by someone else: a replay would undo it.
        lose_unsynced(&path, 0, 5);
        let j = JournaledFile::open(&path, 1 << 20).unwrap();
        assert_eq!(read_page(&path, 0), page(5));
        j.close().unwrap();
    }

    #[derive(Debug, Clone)]
    enum Step {
        Write { page: u64, pages: u64, fill: u8 },
        SetLen { pages: u64 },
        Read { page: u64, pages: u64 },
        Sync,
    }

    /// The bytes `pages` pages from `page` take, when a file of `len` bytes holds them.
    fn span(page: u64, pages: u64, len: usize) -> Option<std::ops::Range<usize>> {
        let (at, end) = (page as usize * PAGE, (page + pages) as usize * PAGE);
        (end <= len).then_some(at..end)
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0..24u64, 1..5u64, 1..=255u8)
                .prop_map(|(page, pages, fill)| Step::Write { page, pages, fill }),
            1 => (0..28u64).prop_map(|pages| Step::SetLen { pages }),
            2 => (0..24u64, 1..5u64).prop_map(|(page, pages)| Step::Read { page, pages }),
            2 => Just(Step::Sync),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Writes of any length over any earlier ones, cuts and growths, syncs and
        /// checkpoints, then a crash that loses every write to the queue file since the
        /// last checkpoint: reopened, the queue file holds what the last sync covered.
        #[test]
        fn a_crash_after_any_writes_leaves_the_queue_file_as_the_last_sync_had_it(
            steps in proptest::collection::vec(step(), 1..80),
        ) {
            // Room for a few groups, so checkpoints happen.
            let capacity = 24 * PAGE as u64;
            let (_dir, path, j) = fresh(capacity);
            let header = || {
                let mut h = [0u8; 20];
                File::open(journal_path(&path)).unwrap().read_exact_at(&mut h, 0).unwrap();
                h
            };
            let mut model: Vec<u8> = Vec::new();
            // What the disk holds of the queue file: its bytes at the last checkpoint, which
            // synced it and then wrote a new journal header.
            let mut generation = header();
            let mut on_disk = std::fs::read(&path).unwrap();
            // The last step is a sync: the crash follows it.
            for step in steps.into_iter().chain([Step::Sync]) {
                match step {
                    Step::Write { page, pages, fill } => {
                        if let Some(r) = span(page, pages, model.len()) {
                            j.write(r.start as u64, &vec![fill; r.len()]).unwrap();
                            model[r].fill(fill);
                        }
                    }
                    Step::SetLen { pages } => {
                        j.set_len(pages * PAGE as u64).unwrap();
                        model.resize(pages as usize * PAGE, 0);
                    }
                    Step::Read { page, pages } => {
                        if let Some(r) = span(page, pages, model.len()) {
                            let mut out = vec![0; r.len()];
                            j.read(r.start as u64, &mut out).unwrap();
                            proptest::prop_assert!(out == model[r]);
                        }
                    }
                    Step::Sync => j.sync_data().unwrap(),
                }
                let now = header();
                if now != generation {
                    generation = now;
                    on_disk = std::fs::read(&path).unwrap();
                }
            }
            crash(j);
            std::fs::write(&path, &on_disk).unwrap();
            let j = JournaledFile::open(&path, capacity).unwrap();
            proptest::prop_assert_eq!(j.len().unwrap(), model.len() as u64);
            let recovered = std::fs::read(&path).unwrap();
            proptest::prop_assert!(recovered == model, "after a crash: the synced bytes");
            j.close().unwrap();
        }
    }

    #[test]
    fn a_second_open_of_the_same_file_is_refused_before_the_journal_is_read() {
        let (_dir, path, j) = fresh(1 << 20);
        let second = JournaledFile::open(&path, 1 << 20);
        assert!(
            matches!(second, Err(redb::DatabaseError::DatabaseAlreadyOpen)),
            "{second:?}"
        );
        j.close().unwrap();
    }
}
