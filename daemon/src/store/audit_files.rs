//! The audit log's own storage: append-only segment files in
//! `<store>/audit/` (docs/AUDIT.md §4).
//!
//! Why not the sled tree it used to live in: the log is append-only and
//! hash-chained, so a B-tree buys nothing and costs a lot: an insert per
//! record, sled's background I/O, and memory that grew with every record.
//! Here a group-commit round is one `pwrite` and one `fdatasync` of the
//! round's frames at the end of the current segment, and that write is the
//! durability point (no separate write-ahead file).
//!
//! A segment is named by the first sequence number it holds
//! (`00000000000000000001.log`) and is a sequence of frames:
//!
//! ```text
//! kind (b'r' record, b's' seal) || u64be(seq) || u32be(len) || value || SHA-256(all before)
//! ```
//!
//! The segment being written is preallocated with zeros ahead of the data
//! (so that `fdatasync` writes data, not a size change, most of the time):
//! a zero byte where a frame would start marks the end of its data. A
//! segment that is full is trimmed to its data before the next one is
//! created.
//!
//! Memory is O(segments): the index holds each segment's first sequence
//! number and length, plus, for the segment being written (and the one
//! before it), the offset of a frame every [`MARK_EVERY`] bytes so that a
//! reverse scan of the tail reads only its last chunks. Other segments are
//! read whole (once) by a reverse scan that reaches them. Opening reads the last segment only (to find
//! a torn tail); the others are known by their names.
//!
//! Damage is reported, never hidden: a frame whose checksum is wrong is
//! returned by the scans as [`StoreError::AuditFrame`] (`audit verify`
//! names it), and only bytes after the last intact frame of the last
//! segment (a write that was never acknowledged) are cut off at open.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use sha2::{Digest, Sha256};

use super::{AuditIter, AuditKind, StoreError};

/// A new segment is started once the current one holds this much.
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// The segment being written is extended with zeros by this much at a time.
const PREALLOCATE: u64 = 4 << 20;
/// Distance between two offsets remembered for reverse scans.
const MARK_EVERY: u64 = 64 << 10;
/// The test-only knob for the segment size (see [`AuditFiles::open`]).
pub const TEST_SEGMENT_BYTES_ENV: &str = "KEYHAVEN_TEST_AUDIT_SEGMENT_BYTES";
/// The file in the folder that holds the retention [`Boundary`].
pub const BOUNDARY_FILE: &str = "boundary.json";
/// Bytes before a frame's value: kind, seq, length.
pub const FRAME_HEAD: usize = 1 + 8 + 4;
/// Bytes of a frame around its value.
pub const FRAME_OVERHEAD: usize = FRAME_HEAD + 32;
/// Largest value a frame may hold (records are far smaller): bounds what a
/// damaged length field can make a reader allocate.
const MAX_VALUE: usize = 16 << 20;
/// How much a forward scan reads at a time.
const READ_CHUNK: usize = 1 << 20;
/// How far past damage a scan looks for the next intact frame.
const MAX_RESYNC: u64 = 256 << 20;
/// Largest last segment that opening reads (the daemon writes at most
/// about [`SEGMENT_BYTES`] plus a round and the preallocated zeros).
const MAX_LAST: u64 = 1 << 30;

fn kind_byte(kind: AuditKind) -> u8 {
    match kind {
        AuditKind::Record => b'r',
        AuditKind::Seal => b's',
    }
}

/// Appends one frame: `kind (1) | seq (8, BE) | len (4, BE) | value |
/// SHA-256 of the preceding bytes of the frame (32)`.
pub fn frame(out: &mut Vec<u8>, kind: AuditKind, seq: u64, value: &[u8]) {
    let start = out.len();
    out.push(kind_byte(kind));
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&(value.len() as u32).to_be_bytes());
    out.extend_from_slice(value);
    let sum: [u8; 32] = Sha256::digest(&out[start..]).into();
    out.extend_from_slice(&sum);
}

/// Reads the frame at the start of `buf`: (kind, seq, value, frame length),
/// or None when it is not a whole, intact frame.
pub fn read_frame(buf: &[u8]) -> Option<(AuditKind, u64, &[u8], usize)> {
    match step(buf, buf.len() as u64) {
        Step::Frame { kind, seq, value, size } => Some((kind, seq, value, size)),
        _ => None,
    }
}

/// What lies at a frame boundary.
enum Step<'a> {
    /// An intact frame of `size` bytes.
    Frame { kind: AuditKind, seq: u64, value: &'a [u8], size: usize },
    /// A whole frame whose checksum is wrong (its header may be wrong too).
    Damaged { kind: AuditKind, seq: u64, size: usize },
    /// The frame is longer than the buffer: read at least this many bytes.
    More(usize),
    /// Zeros (preallocated space) or nothing: the end of the data.
    End,
    /// Not a frame, and nothing after it can be found.
    Garbage(&'static str),
}

/// Parses the frame at the start of `buf`, of which `remaining` bytes
/// (at least `buf.len()`) are left in the segment.
fn step(buf: &[u8], remaining: u64) -> Step<'_> {
    let Some(&first) = buf.first() else { return Step::End };
    if first == 0 {
        return Step::End;
    }
    let kind = match first {
        b'r' => AuditKind::Record,
        b's' => AuditKind::Seal,
        _ => return Step::Garbage("not a frame (unknown kind byte)"),
    };
    let Some(head) = buf.get(..FRAME_HEAD) else {
        return if remaining > buf.len() as u64 {
            Step::More(FRAME_HEAD)
        } else {
            Step::Garbage("a frame cut short")
        };
    };
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&head[1..9]);
    let seq = u64::from_be_bytes(seq);
    let mut len = [0u8; 4];
    len.copy_from_slice(&head[9..13]);
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_VALUE {
        return Step::Garbage("a frame with an impossible length");
    }
    let size = FRAME_OVERHEAD + len;
    if size as u64 > remaining {
        return Step::Garbage("a frame cut short");
    }
    let Some(whole) = buf.get(..size) else { return Step::More(size) };
    let end = FRAME_HEAD + len;
    let want: [u8; 32] = Sha256::digest(&whole[..end]).into();
    if whole[end..] == want {
        Step::Frame { kind, seq, value: &whole[FRAME_HEAD..end], size }
    } else {
        Step::Damaged { kind, seq, size }
    }
}

/// One segment as the index knows it.
#[derive(Clone, Debug)]
struct Segment {
    /// The first sequence number it holds (its name).
    first: u64,
    path: PathBuf,
    /// Bytes of frames (the segment being written may have zeros after).
    len: u64,
    /// Offsets of frames, ascending, starting with 0, about
    /// [`MARK_EVERY`] apart; only for the segment being written.
    marks: Vec<u64>,
}

/// A segment as [`AuditFiles::segments`] lists it.
#[derive(Clone, Debug)]
pub struct SegmentInfo {
    /// The first sequence number it holds (its name).
    pub first: u64,
    pub path: PathBuf,
    /// Bytes of frames.
    pub len: u64,
}

/// Where the log starts after retention (docs/AUDIT.md §12): record
/// `first` is the first one kept, and `prev` (hex) the hash of the record
/// before it, which `first`'s own `prev` must match. A retention record
/// in the chain (op `audit_retention`) says the same, and `audit verify`
/// checks that it does.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Boundary {
    pub first: u64,
    pub prev: String,
}

pub fn segment_name(first: u64) -> String {
    format!("{first:020}.log")
}

/// The segment being written.
struct Active {
    file: File,
    path: PathBuf,
    /// Bytes of frames.
    len: u64,
    /// Bytes of the file (frames, then zeros).
    allocated: u64,
    /// The folder was `fsync`ed after the file was created: until it is,
    /// no flush to this file counts as durable (a failed folder sync is
    /// tried again by the next flush, rather than creating the file again).
    dir_synced: bool,
}

/// Frames waiting for [`AuditFiles::flush`], and the file they go to.
struct Writer {
    pending: Vec<u8>,
    /// The sequence number of the first record frame among `pending`.
    first_record: Option<u64>,
    /// ... and of the first frame of any kind.
    first_any: Option<u64>,
    active: Option<Active>,
}

/// The audit log's segment files.
pub struct AuditFiles {
    dir: PathBuf,
    segment_bytes: u64,
    index: RwLock<Vec<Segment>>,
    writer: Mutex<Writer>,
    /// Segments named below this were removed by retention: a scan that
    /// listed one before it went passes over it.
    retired_below: Arc<std::sync::atomic::AtomicU64>,
}

fn io_err(path: &Path, offset: u64, what: &str, e: std::io::Error) -> StoreError {
    StoreError::AuditFile { file: path.display().to_string(), offset, reason: format!("{what}: {e}") }
}

/// A write of the log that failed: [`StoreError::Unwritable`], so that the
/// refusals and `health` name the condition (a full disk) and the file.
fn write_err(path: &Path, offset: u64, what: &str, e: std::io::Error) -> StoreError {
    super::unwritable(path, &format!("{what} at offset {offset}"), &e)
}

/// `fsync` of a folder, so that a file created (or removed) in it stays.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| write_err(dir, 0, "cannot sync the folder", e))
}

impl AuditFiles {
    /// Opens (creating it when needed, 0700) the folder, indexes its
    /// segments, and cuts off a torn tail of the last one. The segment size
    /// is [`SEGMENT_BYTES`], or for tests `KEYHAVEN_TEST_AUDIT_SEGMENT_BYTES`
    /// (at least 4096), so that a test makes several segments quickly.
    pub fn open(dir: &Path) -> Result<AuditFiles, StoreError> {
        let size = std::env::var(TEST_SEGMENT_BYTES_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(SEGMENT_BYTES, |n| n.clamp(4096, SEGMENT_BYTES));
        AuditFiles::open_with(dir, size)
    }

    /// The segments, oldest first; the last is the one being written.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        let index = self.index.read().unwrap_or_else(|e| e.into_inner());
        index.iter().map(|s| SegmentInfo { first: s.first, path: s.path.clone(), len: s.len }).collect()
    }

    /// The retention boundary (docs/AUDIT.md §12): records before it were
    /// archived or deleted. `None` when the log starts at record 1.
    pub fn boundary(&self) -> Result<Option<Boundary>, StoreError> {
        let path = self.dir.join(BOUNDARY_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| StoreError::AuditFile {
                file: path.display().to_string(),
                offset: 0,
                reason: format!("not a retention boundary: {e}"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path, 0, "cannot read the retention boundary", e)),
        }
    }

    /// Retention: records `boundary` (written to a temporary file, synced,
    /// renamed), then removes every segment before `boundary.first` —
    /// never the segment being written. Returns the files removed.
    pub fn retire(&self, boundary: &Boundary) -> Result<Vec<PathBuf>, StoreError> {
        self.write_boundary(boundary)?;
        let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
        let keep = index.len().saturating_sub(1);
        self.retired_below.fetch_max(boundary.first, std::sync::atomic::Ordering::AcqRel);
        let mut removed = Vec::new();
        while removed.len() < keep && index.first().is_some_and(|s| s.first < boundary.first) {
            let seg = index.remove(0);
            if let Err(e) = std::fs::remove_file(&seg.path) {
                let err = io_err(&seg.path, 0, "cannot remove the retired segment", e);
                index.insert(0, seg);
                return Err(err);
            }
            removed.push(seg.path);
        }
        drop(index);
        sync_dir(&self.dir)?;
        Ok(removed)
    }

    /// Writes the retention boundary (a temporary file, synced, renamed,
    /// the folder synced): by [`retire`](AuditFiles::retire), and by a
    /// store copy of a trimmed log.
    pub fn write_boundary(&self, boundary: &Boundary) -> Result<(), StoreError> {
        let path = self.dir.join(BOUNDARY_FILE);
        let tmp = self.dir.join(format!("{BOUNDARY_FILE}.tmp"));
        let bytes = serde_json::to_vec(boundary).map_err(|e| StoreError::Backend(e.to_string()))?;
        let write = || -> std::io::Result<()> {
            let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            std::io::Write::write_all(&mut f, &bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|e| io_err(&path, 0, "cannot write the retention boundary", e))?;
        sync_dir(&self.dir)
    }

    /// [`open`](AuditFiles::open) with another segment size (for tests).
    pub fn open_with(dir: &Path, segment_bytes: u64) -> Result<AuditFiles, StoreError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io_err(dir, 0, "cannot create the folder", e))?;
        let mut index = Vec::new();
        let entries = std::fs::read_dir(dir).map_err(|e| io_err(dir, 0, "cannot list the folder", e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io_err(dir, 0, "cannot list the folder", e))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let first = name
                .strip_suffix(".log")
                .filter(|s| s.len() == 20 && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok());
            let Some(first) = first else {
                if name == BOUNDARY_FILE || name.ends_with(".tmp") {
                    continue;
                }
                tracing::warn!("{}: not an audit segment; ignored", entry.path().display());
                continue;
            };
            let len = entry.metadata().map_err(|e| io_err(&entry.path(), 0, "cannot stat it", e))?.len();
            index.push(Segment { first, path: entry.path(), len, marks: vec![0] });
        }
        index.sort_by_key(|s| s.first);
        let mut active = None;
        if let Some(last) = index.last_mut() {
            let (a, marks) = open_last(last)?;
            last.len = a.len;
            last.marks = marks;
            if a.len == 0 {
                // Created, never written (a crash right after): start afresh.
                std::fs::remove_file(&a.path).map_err(|e| io_err(&a.path, 0, "cannot remove it", e))?;
                sync_dir(dir)?;
                index.pop();
            } else {
                active = Some(a);
            }
        }
        for s in index.iter_mut().rev().skip(1) {
            s.marks = Vec::new();
        }
        Ok(AuditFiles {
            dir: dir.to_owned(),
            segment_bytes,
            index: RwLock::new(index),
            writer: Mutex::new(Writer { pending: Vec::new(), first_record: None, first_any: None, active }),
            retired_below: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        })
    }

    /// Adds a frame to the next write (not durable until [`flush`](AuditFiles::flush)).
    pub fn put(&self, kind: AuditKind, seq: u64, value: &[u8]) {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if kind == AuditKind::Record && w.first_record.is_none() {
            w.first_record = Some(seq);
        }
        if w.first_any.is_none() {
            w.first_any = Some(seq);
        }
        frame(&mut w.pending, kind, seq, value);
    }

    /// Writes every frame added so far with one `pwrite` and one
    /// `fdatasync`. On failure they stay pending, to be written by the next
    /// flush at the same offset (the chain must not get a hole).
    pub fn flush(&self) -> Result<(), StoreError> {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if w.pending.is_empty() {
            return Ok(());
        }
        let rotate = match &w.active {
            None => true,
            Some(a) => a.len >= self.segment_bytes && w.first_record.is_some(),
        };
        if rotate {
            let first = w.first_record.or(w.first_any).unwrap_or(1);
            self.rotate(&mut w, first)?;
        }
        let Writer { pending, active, first_record, first_any } = &mut *w;
        let Some(a) = active.as_mut() else {
            return Err(StoreError::Backend("audit log: no segment to write to".into()));
        };
        let start = a.len;
        let end = start + pending.len() as u64;
        if end > a.allocated {
            let target = end.max(a.allocated + PREALLOCATE);
            let zeros = vec![0u8; READ_CHUNK];
            let mut at = a.allocated;
            while at < target {
                let n = (target - at).min(zeros.len() as u64) as usize;
                a.file
                    .write_all_at(&zeros[..n], at)
                    .map_err(|e| write_err(&a.path, at, "cannot extend it", e))?;
                at += n as u64;
            }
            a.allocated = target;
        }
        a.file.write_all_at(pending, start).map_err(|e| write_err(&a.path, start, "cannot write", e))?;
        a.file.sync_data().map_err(|e| write_err(&a.path, start, "cannot fdatasync", e))?;
        if !a.dir_synced {
            sync_dir(&self.dir)?;
            a.dir_synced = true;
        }
        a.len = end;
        pending.clear();
        *first_record = None;
        *first_any = None;
        let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = index.last_mut() {
            s.len = end;
            if s.marks.last().is_none_or(|m| start - m >= MARK_EVERY) {
                s.marks.push(start);
            }
        }
        Ok(())
    }

    /// Trims the full segment to its frames and starts a new one, named
    /// `first`.
    fn rotate(&self, w: &mut Writer, first: u64) -> Result<(), StoreError> {
        if let Some(a) = w.active.take() {
            let trim = a.file.set_len(a.len).and_then(|()| a.file.sync_all());
            if let Err(e) = trim {
                let err = write_err(&a.path, a.len, "cannot trim the full segment", e);
                w.active = Some(a);
                return Err(err);
            }
            // The full segment keeps its marks (a tail read may cross into
            // it); the one before it drops them, so memory stays bounded.
            let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
            let n = index.len();
            if n >= 2 {
                index[n - 2].marks = Vec::new();
            }
        }
        let path = self.dir.join(segment_name(first));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| write_err(&path, 0, "cannot create the segment", e))?;
        tracing::debug!("audit log: new segment {}", path.display());
        self.index.write().unwrap_or_else(|e| e.into_inner()).push(Segment {
            first,
            path: path.clone(),
            len: 0,
            marks: vec![0],
        });
        // The segment is the one written from now on even if the folder's
        // sync fails: the next flush syncs it before it counts (creating
        // it again would find it there).
        w.active = Some(Active { file, path, len: 0, allocated: 0, dir_synced: false });
        sync_dir(&self.dir)?;
        if let Some(a) = w.active.as_mut() {
            a.dir_synced = true;
        }
        Ok(())
    }

    /// Entries of `kind`: ascending from `from`, or (with `reverse`)
    /// descending from `from` down, in the order they were written.
    pub fn scan(&self, kind: AuditKind, from: u64, reverse: bool) -> AuditIter<'_> {
        let index = self.index.read().unwrap_or_else(|e| e.into_inner());
        // A segment holds sequence numbers from its name on.
        let after = index.iter().position(|s| s.first > from).unwrap_or(index.len());
        let segments: Vec<Segment> = if reverse {
            index[..after].iter().rev().cloned().collect()
        } else {
            index[after.saturating_sub(1)..].to_vec()
        };
        drop(index);
        let retired = self.retired_below.clone();
        Box::new(Scan { segments: segments.into_iter(), kind, from, reverse, current: None, retired })
    }
}

/// Reads the last segment whole: where its frames end (cutting off a torn
/// tail) and the marks for reverse scans.
fn open_last(seg: &Segment) -> Result<(Active, Vec<u64>), StoreError> {
    let path = &seg.path;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| io_err(path, 0, "cannot open the last segment", e))?;
    let size = file.metadata().map_err(|e| io_err(path, 0, "cannot stat it", e))?.len();
    if size > MAX_LAST {
        return Err(StoreError::AuditFile {
            file: path.display().to_string(),
            offset: 0,
            reason: format!("{size} bytes: larger than any segment the daemon writes"),
        });
    }
    let mut buf = vec![0u8; size as usize];
    file.read_exact_at(&mut buf, 0).map_err(|e| io_err(path, 0, "cannot read it", e))?;
    let mut at = 0usize;
    let mut good_end = 0usize;
    let mut marks = vec![0u64];
    loop {
        match step(&buf[at..], (buf.len() - at) as u64) {
            Step::Frame { size, .. } => {
                at += size;
                good_end = at;
            }
            // Maybe tampering in the middle: kept, and reported by scans,
            // unless no intact frame follows (then it is the torn tail).
            Step::Damaged { size, .. } => at += size,
            // Zeros to the end: the preallocated space. Else bytes that
            // are not a frame: the torn tail, unless an intact frame
            // follows (damage in the middle, kept for `audit verify`).
            Step::More(_) | Step::End | Step::Garbage(_) => {
                if buf[at..].iter().all(|b| *b == 0) {
                    break;
                }
                match resync(&buf, at) {
                    Some(next) => at = next,
                    None => break,
                }
            }
        }
        if at < buf.len() && marks.last().is_some_and(|m| at as u64 - m >= MARK_EVERY) {
            marks.push(at as u64);
        }
    }
    marks.retain(|m| *m < good_end as u64 || *m == 0);
    let mut allocated = size;
    if buf[good_end..].iter().any(|b| *b != 0) {
        tracing::warn!(
            "audit log {}: {} bytes after offset {good_end} are not intact frames (a write that was \
             never acknowledged, cut short by a crash); truncating the segment at offset {good_end}",
            path.display(),
            buf.len() - good_end
        );
        file.set_len(good_end as u64)
            .and_then(|()| file.sync_all())
            .map_err(|e| io_err(path, good_end as u64, "cannot truncate the torn tail", e))?;
        allocated = good_end as u64;
    }
    Ok((Active { file, path: path.clone(), len: good_end as u64, allocated, dir_synced: true }, marks))
}

/// A frame found by a scan of one segment, or the damage found instead.
enum Found {
    Frame { kind: AuditKind, seq: u64, offset: u64, size: usize },
    Bad { kind: Option<AuditKind>, seq: Option<u64>, offset: u64, reason: &'static str },
}

/// The first offset after `from` in `buf` where an intact frame starts (a
/// SHA-256 checksum does not match by chance).
fn resync(buf: &[u8], from: usize) -> Option<usize> {
    (from + 1..buf.len()).find(|i| matches!(step(&buf[*i..], (buf.len() - i) as u64), Step::Frame { .. }))
}

/// Walks the frames of `[start, end)` of a segment, reading a chunk at a
/// time. Within `[0, len)` of a segment every byte belongs to a frame, so
/// anything else is damage: reported, then passed over up to the next
/// intact frame.
struct Frames {
    file: Arc<File>,
    path: PathBuf,
    end: u64,
    /// File offset of `buf[0]`.
    pos: u64,
    buf: Vec<u8>,
    at: usize,
    done: bool,
}

impl Frames {
    fn new(file: Arc<File>, path: PathBuf, start: u64, end: u64) -> Frames {
        Frames { file, path, end, pos: start, buf: Vec::new(), at: 0, done: false }
    }

    fn fill(&mut self, offset: u64, n: usize) -> Result<(), StoreError> {
        self.pos = offset;
        self.at = 0;
        self.buf.resize(n, 0);
        self.file.read_exact_at(&mut self.buf, offset).map_err(|e| {
            self.done = true;
            io_err(&self.path, offset, "cannot read", e)
        })
    }

    /// The next frame with its value, or the damage.
    fn next_frame(&mut self) -> Option<Result<(Found, Vec<u8>), StoreError>> {
        loop {
            if self.done {
                return None;
            }
            let offset = self.pos + self.at as u64;
            let remaining = self.end.saturating_sub(offset);
            if remaining == 0 {
                self.done = true;
                return None;
            }
            let avail = &self.buf[self.at..];
            let need = match step(avail, remaining) {
                Step::Frame { kind, seq, value, size } => {
                    let v = value.to_vec();
                    self.at += size;
                    return Some(Ok((Found::Frame { kind, seq, offset, size }, v)));
                }
                Step::Damaged { kind, seq, size } => {
                    self.at += size;
                    let reason = "the frame's checksum does not match: it was altered";
                    return Some(Ok((
                        Found::Bad { kind: Some(kind), seq: Some(seq), offset, reason },
                        vec![],
                    )));
                }
                Step::End if avail.is_empty() => READ_CHUNK,
                Step::More(n) => n,
                Step::End | Step::Garbage(_) => {
                    let reason = match step(avail, remaining) {
                        Step::Garbage(r) => r,
                        _ => "zeros where a frame should start",
                    };
                    let kind = match avail.first() {
                        Some(b'r') => Some(AuditKind::Record),
                        Some(b's') => Some(AuditKind::Seal),
                        _ => None,
                    };
                    // Read the rest of the segment and look for the next
                    // intact frame (damage is rare; this read is too).
                    if let Err(e) = self.fill(offset, remaining.min(MAX_RESYNC) as usize) {
                        return Some(Err(e));
                    }
                    match resync(&self.buf, 0) {
                        Some(j) => self.at = j,
                        None => self.done = true,
                    }
                    return Some(Ok((Found::Bad { kind, seq: None, offset, reason }, vec![])));
                }
            };
            let n = need.max(READ_CHUNK).min(remaining as usize);
            if let Err(e) = self.fill(offset, n) {
                return Some(Err(e));
            }
        }
    }
}

/// An audit scan over a snapshot of the index.
struct Scan {
    segments: std::vec::IntoIter<Segment>,
    kind: AuditKind,
    from: u64,
    reverse: bool,
    current: Option<Current>,
    retired: Arc<std::sync::atomic::AtomicU64>,
}

/// The segment a scan is in.
struct Current {
    seg: Segment,
    file: Arc<File>,
    /// Forward: the frames being read.
    frames: Frames,
    /// Reverse: chunks not read yet (start, end), and the frames of the
    /// chunk being returned, last first.
    chunks: Vec<(u64, u64)>,
    found: Vec<Found>,
    done: bool,
}

impl Scan {
    fn wanted(&self, kind: Option<AuditKind>, seq: Option<u64>) -> bool {
        let kind_ok = match kind {
            Some(k) => k == self.kind,
            // Not a frame at all: reported once, with the records.
            None => self.kind == AuditKind::Record,
        };
        let seq_ok = match seq {
            None => true,
            Some(s) if self.reverse => s <= self.from,
            Some(s) => s >= self.from,
        };
        kind_ok && seq_ok
    }

    fn error(seg: &Segment, seq: Option<u64>, offset: u64, reason: &str) -> StoreError {
        StoreError::AuditFrame {
            file: seg.path.display().to_string(),
            offset,
            seq,
            reason: reason.to_owned(),
        }
    }

    fn next_in(&self, cur: &mut Current) -> Option<Result<(u64, Vec<u8>), StoreError>> {
        if !self.reverse {
            loop {
                let f = match cur.frames.next_frame() {
                    None => {
                        cur.done = true;
                        return None;
                    }
                    Some(Err(e)) => {
                        cur.done = true;
                        return Some(Err(e));
                    }
                    Some(Ok(f)) => f,
                };
                match f {
                    (Found::Frame { kind, seq, .. }, value) => {
                        if self.wanted(Some(kind), Some(seq)) {
                            return Some(Ok((seq, value)));
                        }
                    }
                    (Found::Bad { kind, seq, offset, reason }, _) => {
                        if self.wanted(kind, seq) {
                            return Some(Err(Scan::error(&cur.seg, seq, offset, reason)));
                        }
                    }
                }
            }
        }
        loop {
            if let Some(found) = cur.found.pop() {
                return Some(match found {
                    Found::Frame { seq, offset, size, .. } => {
                        let mut buf = vec![0u8; size];
                        match cur.file.read_exact_at(&mut buf, offset) {
                            Err(e) => Err(io_err(&cur.seg.path, offset, "cannot read", e)),
                            Ok(()) => match read_frame(&buf) {
                                Some((_, _, value, _)) => Ok((seq, value.to_vec())),
                                None => Err(Scan::error(
                                    &cur.seg,
                                    Some(seq),
                                    offset,
                                    "the frame changed while read",
                                )),
                            },
                        }
                    }
                    Found::Bad { seq, offset, reason, .. } => Err(Scan::error(&cur.seg, seq, offset, reason)),
                });
            }
            let Some((start, end)) = cur.chunks.pop() else {
                cur.done = true;
                return None;
            };
            // The chunk's frames, going forward; returned last first.
            let mut frames = Frames::new(cur.file.clone(), cur.seg.path.clone(), start, end);
            while let Some(f) = frames.next_frame() {
                let found = match f {
                    Ok((found, _)) => found,
                    Err(e) => {
                        cur.done = true;
                        return Some(Err(e));
                    }
                };
                let (kind, seq) = match &found {
                    Found::Frame { kind, seq, .. } => (Some(*kind), Some(*seq)),
                    Found::Bad { kind, seq, .. } => (*kind, *seq),
                };
                if self.wanted(kind, seq) {
                    cur.found.push(found);
                }
            }
        }
    }
}

impl Iterator for Scan {
    type Item = Result<(u64, Vec<u8>), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.current.is_none() {
                let seg = self.segments.next()?;
                let file = match File::open(&seg.path) {
                    Ok(f) => Arc::new(f),
                    Err(e)
                        if e.kind() == std::io::ErrorKind::NotFound
                            && seg.first < self.retired.load(std::sync::atomic::Ordering::Acquire) =>
                    {
                        continue
                    }
                    Err(e) => return Some(Err(io_err(&seg.path, 0, "cannot open the segment", e))),
                };
                // Reverse: chunks between marks (one chunk for a segment
                // without them), read last first.
                let mut bounds = if seg.marks.is_empty() { vec![0] } else { seg.marks.clone() };
                bounds.retain(|m| *m < seg.len);
                let chunks = if self.reverse {
                    let mut ends = bounds.iter().skip(1).copied().collect::<Vec<_>>();
                    ends.push(seg.len);
                    bounds.iter().copied().zip(ends).collect()
                } else {
                    Vec::new()
                };
                let frames = Frames::new(file.clone(), seg.path.clone(), 0, seg.len);
                self.current = Some(Current { seg, file, frames, chunks, found: Vec::new(), done: false });
            }
            let mut cur = self.current.take()?;
            let item = self.next_in(&mut cur);
            if !cur.done {
                self.current = Some(cur);
            }
            if item.is_some() {
                return item;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("keyhaven-audit-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn seqs(files: &AuditFiles, kind: AuditKind, from: u64, reverse: bool) -> Vec<u64> {
        files.scan(kind, from, reverse).map(|e| e.unwrap().0).collect()
    }

    /// Records 1..=n, a seal after every 10th, flushed every 7.
    fn fill(files: &AuditFiles, from: u64, n: u64) {
        for seq in from..=n {
            files.put(AuditKind::Record, seq, format!("record {seq} {}", "x".repeat(50)).as_bytes());
            if seq % 10 == 0 {
                files.put(AuditKind::Seal, seq, format!("seal {seq}").as_bytes());
            }
            if seq % 7 == 0 {
                files.flush().unwrap();
            }
        }
        files.flush().unwrap();
    }

    #[test]
    fn segments_rotate_and_scans_cross_them_both_ways() {
        let d = dir("rotate");
        let files = AuditFiles::open_with(&d, 1000).unwrap();
        fill(&files, 1, 200);
        let n = std::fs::read_dir(&d).unwrap().count();
        assert!(n > 5, "{n} segments");
        assert_eq!(seqs(&files, AuditKind::Record, 0, false), (1..=200).collect::<Vec<_>>());
        assert_eq!(seqs(&files, AuditKind::Record, 150, false), (150..=200).collect::<Vec<_>>());
        assert_eq!(seqs(&files, AuditKind::Record, u64::MAX, true), (1..=200).rev().collect::<Vec<_>>());
        assert_eq!(seqs(&files, AuditKind::Record, 42, true), (1..=42).rev().collect::<Vec<_>>());
        assert_eq!(seqs(&files, AuditKind::Seal, 0, false), (1..=20).map(|i| i * 10).collect::<Vec<_>>());
        assert_eq!(seqs(&files, AuditKind::Seal, 55, true), vec![50, 40, 30, 20, 10]);
        let (_, v) = files.scan(AuditKind::Record, 77, false).next().unwrap().unwrap();
        assert!(v.starts_with(b"record 77 "));
        drop(files);
        // Reopened: the same, and writing goes on.
        let files = AuditFiles::open_with(&d, 1000).unwrap();
        fill(&files, 201, 230);
        assert_eq!(seqs(&files, AuditKind::Record, 0, false), (1..=230).collect::<Vec<_>>());
        assert_eq!(seqs(&files, AuditKind::Seal, u64::MAX, true)[0], 230);
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn retire_removes_old_segments_never_the_last_and_keeps_the_boundary() {
        let d = dir("retire");
        let files = AuditFiles::open_with(&d, 1000).unwrap();
        fill(&files, 1, 200);
        let segs = files.segments();
        assert!(segs.len() > 5);
        // A scan listed before the removal passes over the removed files.
        let early = files.scan(AuditKind::Record, 0, false);
        let b = Boundary { first: segs[3].first, prev: "00".repeat(32) };
        let removed = files.retire(&b).unwrap();
        assert_eq!(removed.len(), 3);
        assert!(removed.iter().all(|p| !p.exists()));
        let first = segs[3].first;
        assert_eq!(early.map(|e| e.unwrap().0).collect::<Vec<_>>(), (first..=200).collect::<Vec<_>>());
        assert_eq!(seqs(&files, AuditKind::Record, 0, false), (first..=200).collect::<Vec<_>>());
        assert_eq!(files.boundary().unwrap(), Some(b.clone()));
        // Past the end: everything but the segment being written.
        let n = files.segments().len();
        let all = files.retire(&Boundary { first: u64::MAX, prev: b.prev.clone() }).unwrap();
        assert_eq!(all.len(), n - 1);
        assert_eq!(files.segments().len(), 1);
        drop(files);
        // Reopened: the boundary file is not taken for a segment.
        let files = AuditFiles::open_with(&d, 1000).unwrap();
        assert_eq!(files.segments().len(), 1);
        assert_eq!(files.boundary().unwrap().map(|b| b.first), Some(u64::MAX));
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn reverse_scans_of_a_long_segment_use_the_marks() {
        let d = dir("marks");
        let files = AuditFiles::open(&d).unwrap();
        let big = vec![b'y'; 3000];
        for seq in 1..=300 {
            files.put(AuditKind::Record, seq, &big);
            files.flush().unwrap();
        }
        let marks = files.index.read().unwrap()[0].marks.len();
        assert!(marks > 10, "{marks}");
        assert_eq!(seqs(&files, AuditKind::Record, u64::MAX, true), (1..=300).rev().collect::<Vec<_>>());
        assert_eq!(seqs(&files, AuditKind::Record, 123, true)[0], 123);
        drop(files);
        let files = AuditFiles::open(&d).unwrap();
        assert!(files.index.read().unwrap()[0].marks.len() > 10);
        assert_eq!(seqs(&files, AuditKind::Record, 200, true).len(), 200);
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_torn_tail_is_cut_and_damage_in_the_middle_is_reported() {
        let d = dir("torn");
        let files = AuditFiles::open(&d).unwrap();
        fill(&files, 1, 20);
        drop(files);
        let seg = d.join(segment_name(1));
        let mut bytes = std::fs::read(&seg).unwrap();
        let data = bytes.iter().rposition(|b| *b != 0).unwrap() + 1;
        // Half a frame after the data (and after the zeros).
        let mut half = Vec::new();
        frame(&mut half, AuditKind::Record, 21, b"never acknowledged");
        bytes.extend_from_slice(&half[..20]);
        // A flipped byte in record 5's value.
        let at = (0..data).find(|i| bytes[*i..].starts_with(b"record 5 ")).unwrap();
        bytes[at + 8] ^= 1;
        std::fs::write(&seg, &bytes).unwrap();
        let files = AuditFiles::open(&d).unwrap();
        assert!(std::fs::metadata(&seg).unwrap().len() as usize >= data, "the middle is not cut");
        let all: Vec<_> = files.scan(AuditKind::Record, 0, false).collect();
        assert_eq!(all.len(), 20);
        match &all[4] {
            Err(StoreError::AuditFrame { seq: Some(5), .. }) => {}
            other => panic!("{:?}", other.as_ref().map(|x| x.0)),
        }
        let back: Vec<_> = files.scan(AuditKind::Record, u64::MAX, true).collect();
        assert_eq!(back.len(), 20);
        assert!(matches!(&back[15], Err(StoreError::AuditFrame { seq: Some(5), .. })));
        fill(&files, 21, 25);
        let ok: Vec<u64> = files.scan(AuditKind::Record, 6, false).map(|e| e.unwrap().0).collect();
        assert_eq!(ok, (6..=25).collect::<Vec<_>>());
        // Garbage that cannot be a frame, in the middle of a segment: reported, no panic.
        drop(files);
        let mut bytes = std::fs::read(&seg).unwrap();
        let at = (0..bytes.len()).find(|i| bytes[*i..].starts_with(b"record 9 ")).unwrap();
        bytes[at - FRAME_HEAD] = b'?';
        std::fs::write(&seg, &bytes).unwrap();
        let files = AuditFiles::open(&d).unwrap();
        let all: Vec<_> = files.scan(AuditKind::Record, 0, false).collect();
        assert!(all.iter().any(|e| matches!(e, Err(StoreError::AuditFrame { seq: None, .. }))));
        let _ = std::fs::remove_dir_all(d);
    }
}
