//! The Python boundary: `ipop_trio._native`. Errors become the project's exceptions here
//! (`Refused`, a BadPacket subclass whose args[0] is the reason code; LocalProtocolError
//! for the caller's mistakes); batch calls release the GIL while they work.

use std::sync::{Arc, Mutex};

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyList, PyType};

use crate::datapath::{self, lock, Entry, Shared, Table};
use crate::offload::{self, Writes};
use crate::session::{Cipher, LocalError, SessionCore, REFUSALS};
use crate::wire;

// WireGuard's timers (whitepaper §6.1), as proto/session.py has them.
const REKEY_AFTER_MESSAGES: u64 = 1 << 60;
const REKEY_AFTER_TIME: f64 = 120.0;
const REJECT_AFTER_TIME: f64 = 180.0;

static REFUSED: PyOnceLock<Py<PyType>> = PyOnceLock::new();

fn refused_type(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    REFUSED
        .get_or_try_init(py, || {
            let base = py.import("ipop_trio.errors")?.getattr("BadPacket")?;
            let base = base.cast_into::<PyType>()?;
            PyErr::new_type(
                py,
                c"ipop_trio._native.Refused",
                Some(c"Bytes from the network the native core refused; args[0] is the reason."),
                Some(&base),
                None,
            )
        })
        .map(|t| t.bind(py))
}

fn refused(py: Python<'_>, reason: &str, why: &str) -> PyErr {
    match refused_type(py) {
        Ok(t) => PyErr::from_type(t.clone(), (reason.to_string(), why.to_string())),
        Err(e) => e,
    }
}

fn local_error(py: Python<'_>, why: &str) -> PyErr {
    let made = py
        .import("ipop_trio.errors")
        .and_then(|m| m.getattr("LocalProtocolError"))
        .and_then(|t| t.cast_into::<PyType>().map_err(PyErr::from));
    match made {
        Ok(t) => PyErr::from_type(t, why.to_string()),
        Err(e) => e,
    }
}

fn local(py: Python<'_>, e: LocalError) -> PyErr {
    local_error(
        py,
        match e {
            LocalError::KeySize => "session keys must be 32 bytes",
            LocalError::Exhausted => {
                "session send counter exhausted (REJECT_AFTER_MESSAGES): rekey"
            }
        },
    )
}

/// A Python buffer's bytes, copied into `scratch` (bytes are borrowed by PyO3 safely, any
/// other buffer is copied once: the caller may reuse it while we work without the GIL).
fn copy_in(py: Python<'_>, obj: &Bound<'_, PyAny>, scratch: &mut Vec<u8>) -> PyResult<()> {
    scratch.clear();
    if let Ok(b) = obj.cast::<PyBytes>() {
        scratch.extend_from_slice(b.as_bytes());
        return Ok(());
    }
    let buf = PyBuffer::<u8>::get(obj)?;
    scratch.resize(buf.item_count(), 0);
    buf.copy_to_slice(py, scratch)
}

/// Make `out` (a bytearray the caller owns and reuses) hold exactly `src`. No view of it
/// may be alive during the call (a bytearray with exports cannot be resized).
fn copy_out(py: Python<'_>, out: &Bound<'_, PyByteArray>, src: &[u8]) -> PyResult<()> {
    out.resize(src.len())?;
    if src.is_empty() {
        return Ok(());
    }
    PyBuffer::<u8>::get(out.as_any())?.copy_from_slice(py, src)
}

fn cipher_of(obj: &Bound<'_, PyAny>) -> PyResult<Cipher> {
    let name: String = match obj.extract() {
        Ok(s) => s,
        Err(_) => obj.getattr("value")?.extract()?,
    };
    Cipher::from_name(&name)
        .ok_or_else(|| PyValueError::new_err(format!("unknown cipher {name:?}")))
}

/// One direction pair of keys after a handshake: proto/session.py's `Session`, natively.
/// Keys go in and never come back out.
#[pyclass(frozen, module = "ipop_trio._native")]
pub struct Session {
    core: Shared,
    /// seal_tap_batch's output before it is copied to the caller's buffer, reused: a fresh
    /// Vec per batch cost a large allocation (mmap, page faults) and its regrowth each call
    scratch: Mutex<Vec<u8>>,
    #[pyo3(get)]
    local_index: u32,
    #[pyo3(get)]
    remote_index: u32,
    #[pyo3(get)]
    secure: bool,
    #[pyo3(get)]
    created: f64,
}

#[pymethods]
impl Session {
    /// Either form: `chaining_key` and `initiator` (a completed handshake: the transport
    /// keys are derived here and never leave the crate), or `send_key` and `recv_key`
    /// (tests and tools with fixed keys).
    #[new]
    #[pyo3(signature = (*, local_index, remote_index, cipher, secure, created = 0.0,
        chaining_key = None, initiator = None, send_key = None, recv_key = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        local_index: i128,
        remote_index: i128,
        cipher: &Bound<'_, PyAny>,
        secure: bool,
        created: f64,
        chaining_key: Option<&[u8]>,
        initiator: Option<bool>,
        send_key: Option<&[u8]>,
        recv_key: Option<&[u8]>,
    ) -> PyResult<Self> {
        let index = |i: i128| {
            u32::try_from(i)
                .map_err(|_| local_error(py, &format!("session index {i} does not fit in a u32")))
        };
        let (local_index, remote_index) = (index(local_index)?, index(remote_index)?);
        let cipher = cipher_of(cipher)?;
        let core = match (chaining_key, initiator, send_key, recv_key) {
            (Some(ck), Some(initiator), None, None) => SessionCore::from_chaining_key(
                cipher,
                ck,
                initiator,
                local_index,
                remote_index,
                secure,
            ),
            (None, None, Some(send_key), Some(recv_key)) => SessionCore::new(
                cipher,
                send_key,
                recv_key,
                local_index,
                remote_index,
                secure,
            ),
            _ => {
                return Err(PyTypeError::new_err(
                    "Session takes chaining_key and initiator, or send_key and recv_key",
                ))
            }
        }
        .map_err(|e| local(py, e))?;
        Ok(Session {
            core: Arc::new(Mutex::new(core)),
            scratch: Mutex::new(Vec::new()),
            local_index,
            remote_index,
            secure,
            created,
        })
    }

    /// The counter the next sealed datagram will carry (= datagrams sealed so far).
    #[getter]
    fn send_counter(&self) -> u64 {
        lock(&self.core).send_counter()
    }

    /// Highest counter accepted from the peer, -1 before the first.
    #[getter]
    fn recv_highest(&self) -> i128 {
        lock(&self.core).recv_highest().map_or(-1, |h| h as i128)
    }

    #[getter]
    fn tx_bytes(&self) -> u64 {
        lock(&self.core).tx_bytes
    }

    #[getter]
    fn rx_bytes(&self) -> u64 {
        lock(&self.core).rx_bytes
    }

    #[getter]
    fn rx_packets(&self) -> u64 {
        lock(&self.core).rx_packets
    }

    /// Datagrams refused, by Refusal name (every key, as the Python Session has).
    #[getter]
    fn refused<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let counts = lock(&self.core).refused;
        let d = PyDict::new(py);
        for r in REFUSALS {
            d.set_item(r.name(), counts[r as usize])?;
        }
        Ok(d)
    }

    fn overhead(&self) -> usize {
        lock(&self.core).overhead()
    }

    fn should_rekey(&self, now: f64, initiator: bool) -> bool {
        if lock(&self.core).send_counter() >= REKEY_AFTER_MESSAGES {
            return true;
        }
        initiator && now - self.created >= REKEY_AFTER_TIME
    }

    fn expired(&self, now: f64) -> bool {
        now - self.created >= REJECT_AFTER_TIME
            || lock(&self.core).send_counter() >= wire::REJECT_AFTER_MESSAGES
    }

    /// One data datagram carrying `payload`, with the next counter.
    fn seal<'py>(&self, py: Python<'py>, payload: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        let mut out = Vec::with_capacity(payload.len() + 32);
        lock(&self.core)
            .seal_parts(&mut out, &[payload])
            .map_err(|e| local(py, e))?;
        Ok(PyBytes::new(py, &out))
    }

    /// The payload of a data datagram for this session, or raise Refused(reason).
    fn open_untrusted<'py>(
        &self,
        py: Python<'py>,
        datagram: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let mut d = Vec::new();
        copy_in(py, datagram, &mut d)?;
        let n = lock(&self.core)
            .open_in_place(&mut d)
            .map_err(|r| refused(py, r.name(), "data datagram refused"))?;
        Ok(PyBytes::new(
            py,
            &d[wire::DATA_HEADER_SIZE..wire::DATA_HEADER_SIZE + n],
        ))
    }

    /// Encode one TAP batch (each read: virtio_net_hdr + frame, as bytes) exactly as
    /// `encode_outbound` does, frame ids from `frame_id`, seal every inner payload, and
    /// make `out` hold the datagrams back to back. Returns an OutboundBatch; raises
    /// LocalProtocolError (nothing sealed, no counter used) when the counters would run out.
    #[pyo3(signature = (reads, frame_id, out, *, max_payload = wire::DEFAULT_MAX_PAYLOAD,
        max_segments = wire::UDP_MAX_SEGMENTS, max_bytes = wire::GSO_MAX_BYTES))]
    #[allow(clippy::too_many_arguments)]
    fn seal_tap_batch(
        &self,
        py: Python<'_>,
        reads: Vec<Bound<'_, PyBytes>>,
        frame_id: u64,
        out: &Bound<'_, PyByteArray>,
        max_payload: usize,
        max_segments: usize,
        max_bytes: usize,
    ) -> PyResult<OutboundBatch> {
        let slices: Vec<&[u8]> = reads.iter().map(|r| r.as_bytes()).collect();
        let core = &self.core;
        // try_lock, never lock: waiting here with the GIL held while another thread of the
        // same session waits for the GIL to finish would deadlock. Contended: a fresh Vec.
        let mut own = Vec::new();
        let mut guard = self.scratch.try_lock().ok();
        let buf: &mut Vec<u8> = match guard.as_deref_mut() {
            Some(v) => v,
            None => &mut own,
        };
        let result = py.detach(|| {
            datapath::seal_tap_batch(
                &mut lock(core),
                &slices,
                frame_id as u32,
                max_payload,
                max_segments,
                max_bytes,
                buf,
            )
        });
        let result = result.map_err(|e| local(py, e))?;
        copy_out(py, out, buf)?;
        Ok(OutboundBatch {
            frame_id: result.frame_id,
            runs: result.runs,
            datagrams: result.datagrams,
            nbytes: result.nbytes,
            bad_tap_frame: result.bad_tap_frame,
            frame_bytes: datapath::frame_bytes(&slices),
        })
    }
}

/// What `Session.seal_tap_batch` did.
#[pyclass(frozen, get_all, module = "ipop_trio._native")]
pub struct OutboundBatch {
    /// frame_id for the next batch to this peer
    frame_id: u32,
    /// (offset, length, segment size, count) in `out`: one GSO sendmsg each
    runs: Vec<(usize, usize, usize, usize)>,
    datagrams: usize,
    /// bytes of all datagrams (= len(out))
    nbytes: usize,
    /// TAP reads refused by the encoder (stats.drop("bad_tap_frame", n))
    bad_tap_frame: usize,
    /// sum of the reads' lengths less their virtio headers (port.tx_bytes)
    frame_bytes: i64,
}

/// What `SessionTable.open_batch` did.
#[pyclass(frozen, get_all, module = "ipop_trio._native")]
pub struct InboundBatch {
    /// (TAP write, slot) in order, each write its own bytes (the TAP writer thread keeps
    /// them past the call); slot indexes `sessions`
    writes: Vec<(Py<PyBytes>, usize)>,
    /// (local_index, peer, opened, refused, bad_inner, data, nbytes) per session touched
    sessions: Vec<(u32, u64, usize, usize, usize, bool, usize)>,
    /// (offset, length) in the input of each datagram that is not data, for Python's
    /// handlers (STUN, ChannelData, handshakes, unknown first bytes, runts, empty)
    others: Vec<(usize, usize)>,
    /// non-zero drop counts by stats.drop name
    drops: Vec<(&'static str, usize)>,
    /// datagrams in the call
    datagrams: usize,
    /// some peer still holds pieces of a super-frame (arm the flush timer)
    pending: bool,
}

/// Receive sessions by local index, each with its peer's reassembler.
#[pyclass(module = "ipop_trio._native")]
pub struct SessionTable {
    table: Table,
    rx: Vec<u8>,
    writes: Writes,
}

/// Each TAP write in `w` as its own bytes, with its tag (a slot or a peer), in order: one
/// copy out of the reused buffer, the one the TAP writer thread needs anyway.
fn frames_with<T: Copy>(py: Python<'_>, w: &Writes, tags: &[T]) -> Vec<(Py<PyBytes>, T)> {
    (0..w.spans.len())
        .zip(tags)
        .map(|(i, &t)| (PyBytes::new(py, w.get(i)).unbind(), t))
        .collect()
}

#[pymethods]
impl SessionTable {
    #[new]
    fn new() -> Self {
        SessionTable {
            table: Table::default(),
            rx: Vec::new(),
            writes: Writes::default(),
        }
    }

    fn __len__(&self) -> usize {
        self.table.sessions.len()
    }

    fn __contains__(&self, local_index: u32) -> bool {
        self.table.sessions.contains_key(&local_index)
    }

    /// Receive on `session` (keyed by its local_index) for `peer`, the caller's number for
    /// the peer; the peer's reassembler is made on first use and shared by its sessions.
    fn insert(&mut self, session: &Bound<'_, Session>, peer: u64) {
        let s = session.get();
        self.table.peer(peer);
        self.table.sessions.insert(
            s.local_index,
            Entry {
                session: s.core.clone(),
                peer,
            },
        );
    }

    /// Stop receiving on a local index (True if it was there).
    fn remove(&mut self, local_index: u32) -> bool {
        self.table.sessions.remove(&local_index).is_some()
    }

    /// The path tokens a plain session of `peer` accepts datagrams from (its endpoint and
    /// ICE-valid paths, each a distinct int the caller chose for an (address, relay)).
    fn set_paths(&mut self, peer: u64, paths: Vec<u64>) {
        self.table.peer(peer).paths = paths;
    }

    /// Pieces `peer`'s reassembler holds (0: nothing to flush).
    fn pending(&self, peer: u64) -> usize {
        self.table
            .peers
            .get(&peer)
            .map_or(0, |p| p.reassembler.pending())
    }

    /// frames_whole, frames_partial, segments_rebuilt, pieces_late over every peer, or
    /// one peer's.
    #[pyo3(signature = (peer = None))]
    fn reassembly_counters<'py>(
        &self,
        py: Python<'py>,
        peer: Option<u64>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let c = match peer {
            None => self.table.counters(),
            Some(p) => self
                .table
                .peers
                .get(&p)
                .map(|p| p.reassembler.counters)
                .unwrap_or_default(),
        };
        let d = PyDict::new(py);
        d.set_item("frames_whole", c.frames_whole)?;
        d.set_item("frames_partial", c.frames_partial)?;
        d.set_item("segments_rebuilt", c.segments_rebuilt)?;
        d.set_item("pieces_late", c.pieces_late)?;
        Ok(d)
    }

    /// Open one receive call's datagrams: `data` (any buffer: the receive buffer's filled
    /// part) cut every `segment` bytes as recv_once does, all from the path `path`; returns
    /// an InboundBatch, whose TAP writes are bytes.
    /// Never raises for what the network sent: every datagram is opened, counted as a drop
    /// or handed back in `others`.
    fn open_batch(
        &mut self,
        py: Python<'_>,
        data: &Bound<'_, PyAny>,
        segment: usize,
        path: u64,
    ) -> PyResult<InboundBatch> {
        let SessionTable { table, rx, writes } = self;
        copy_in(py, data, rx)?;
        writes.clear();
        let r = py.detach(|| table.open_batch(rx, segment, path, writes));
        let d = r.drops;
        let drops = [
            ("unknown_session", d.unknown_session),
            ("plain_wrong_path", d.plain_wrong_path),
            ("bad_datagram", d.bad_datagram),
            ("bad_inner_payload", d.bad_inner_payload),
        ];
        Ok(InboundBatch {
            writes: frames_with(py, writes, &r.write_slots),
            sessions: r
                .sessions
                .iter()
                .map(|s| {
                    (
                        s.local_index,
                        s.peer,
                        s.opened,
                        s.refused,
                        s.bad_inner,
                        s.data,
                        s.nbytes,
                    )
                })
                .collect(),
            others: r.others,
            drops: drops.into_iter().filter(|&(_, n)| n > 0).collect(),
            datagrams: r.datagrams,
            pending: table.pending(),
        })
    }

    /// Write out every super-frame still missing pieces (the socket was quiet for
    /// PENDING_FLUSH): returns (TAP write, peer) each.
    fn flush_pending(&mut self, py: Python<'_>) -> Vec<(Py<PyBytes>, u64)> {
        self.writes.clear();
        let peers = self.table.flush_pending(&mut self.writes);
        frames_with(py, &self.writes, &peers)
    }

    /// The peer's session changed: flush its pending frame and forget its frame ids.
    /// Returns (TAP write, peer) each.
    fn reset_peer(&mut self, py: Python<'_>, peer: u64) -> Vec<(Py<PyBytes>, u64)> {
        self.writes.clear();
        if let Some(p) = self.table.peers.get_mut(&peer) {
            p.reassembler.reset(&mut self.writes);
        }
        frames_with(py, &self.writes, &vec![peer; self.writes.spans.len()])
    }

    /// Forget a peer and its sessions; returns its pending frame's TAP writes, flushed
    /// first, as `reset_peer` does.
    fn remove_peer(&mut self, py: Python<'_>, peer: u64) -> Vec<(Py<PyBytes>, u64)> {
        let written = self.reset_peer(py, peer);
        self.table.peers.remove(&peer);
        self.table.sessions.retain(|_, e| e.peer != peer);
        written
    }
}

/// proto/offload.py's `Reassembler` with the same methods (tests and fuzzing; the data
/// path uses the table's).
#[pyclass(module = "ipop_trio._native")]
pub struct Reassembler {
    inner: offload::Reassembler,
    writes: Writes,
}

impl Reassembler {
    fn drain(&mut self, py: Python<'_>, out: &Bound<'_, PyList>) -> PyResult<()> {
        for i in 0..self.writes.spans.len() {
            out.append(PyBytes::new(py, self.writes.get(i)))?;
        }
        self.writes.clear();
        Ok(())
    }
}

#[pymethods]
impl Reassembler {
    #[new]
    fn new() -> Self {
        Reassembler {
            inner: offload::Reassembler::new(),
            writes: Writes::default(),
        }
    }

    #[getter]
    fn pending(&self) -> usize {
        self.inner.pending()
    }

    #[getter]
    fn frames_whole(&self) -> u64 {
        self.inner.counters.frames_whole
    }

    #[getter]
    fn frames_partial(&self) -> u64 {
        self.inner.counters.frames_partial
    }

    #[getter]
    fn segments_rebuilt(&self) -> u64 {
        self.inner.counters.segments_rebuilt
    }

    #[getter]
    fn pieces_late(&self) -> u64 {
        self.inner.counters.pieces_late
    }

    /// Append to `out` the TAP writes `payload` completes, or raise Refused("bad_inner_payload").
    fn push_untrusted(
        &mut self,
        py: Python<'_>,
        payload: &Bound<'_, PyAny>,
        out: &Bound<'_, PyList>,
    ) -> PyResult<()> {
        let mut p = Vec::new();
        copy_in(py, payload, &mut p)?;
        let r = self.inner.push_untrusted(&p, &mut self.writes);
        self.drain(py, out)?;
        r.map_err(|e| refused(py, "bad_inner_payload", e.0))
    }

    fn flush(&mut self, py: Python<'_>, out: &Bound<'_, PyList>) -> PyResult<()> {
        self.inner.flush(&mut self.writes);
        self.drain(py, out)
    }

    fn reset(&mut self, py: Python<'_>, out: &Bound<'_, PyList>) -> PyResult<()> {
        self.inner.reset(&mut self.writes);
        self.drain(py, out)
    }
}

/// proto/offload.py's `encode_outbound`: raise Refused("bad_tap_frame") for what it refuses.
#[pyfunction]
#[pyo3(signature = (read, frame_id, max_payload = wire::DEFAULT_MAX_PAYLOAD))]
fn encode_outbound<'py>(
    py: Python<'py>,
    read: &Bound<'py, PyAny>,
    frame_id: u64,
    max_payload: usize,
) -> PyResult<Vec<Bound<'py, PyBytes>>> {
    let mut r = Vec::new();
    copy_in(py, read, &mut r)?;
    let payloads = offload::encode_outbound(&r, frame_id as u32, max_payload)
        .map_err(|e| refused(py, "bad_tap_frame", e.0))?;
    Ok(payloads.iter().map(|p| PyBytes::new(py, p)).collect())
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("Refused", refused_type(py)?)?;
    m.add_class::<Session>()?;
    m.add_class::<SessionTable>()?;
    m.add_class::<Reassembler>()?;
    m.add_class::<OutboundBatch>()?;
    m.add_class::<InboundBatch>()?;
    m.add_function(wrap_pyfunction!(encode_outbound, m)?)?;
    m.add("DATA_HEADER_SIZE", wire::DATA_HEADER_SIZE)?;
    m.add("TAG_SIZE", wire::TAG_SIZE)?;
    m.add("REJECT_AFTER_MESSAGES", wire::REJECT_AFTER_MESSAGES)?;
    m.add("WINDOW_SIZE", crate::replay::WINDOW_SIZE)?;
    m.add("PLAIN_MAX_JUMP", crate::session::PLAIN_MAX_JUMP)?;
    m.add("MAX_PIECES", wire::MAX_PIECES)?;
    m.add("DEFAULT_MAX_PAYLOAD", wire::DEFAULT_MAX_PAYLOAD)?;
    m.add("UDP_MAX_SEGMENTS", wire::UDP_MAX_SEGMENTS)?;
    m.add("GSO_MAX_BYTES", wire::GSO_MAX_BYTES)?;
    m.add("VNET_HDR_LEN", wire::VNET_HDR_LEN)?;
    Ok(())
}
