//! TAP offload core: proto/offload.py's `encode_outbound` and `Reassembler`, byte for byte.
//! The module docstring of proto/offload.py draws every format used here.
//!
//! Both our kernel's TAP reads and a peer's payloads are untrusted: every function here
//! returns `OffloadError` for what it refuses, never panics on input.

use crate::wire::*;

/// A TAP read or an inner payload refused (counted "bad_tap_frame" / "bad_inner_payload").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OffloadError(pub &'static str);

type R<T> = Result<T, OffloadError>;

fn err<T>(why: &'static str) -> R<T> {
    Err(OffloadError(why))
}

/// (csum_start, csum_offset) of `frame` from its own headers: TCP or UDP over unfragmented
/// IPv4 or over IPv6 without extension headers (proto/offload.py's `_l4_csum_fields`, which
/// says why a peer's NEEDS_CSUM frame must carry exactly these).
fn l4_csum_fields(frame: &[u8]) -> R<(usize, usize)> {
    let n = frame.len();
    if n < ETH_HLEN + 20 {
        return err("NEEDS_CSUM frame shorter than an IP header");
    }
    let (proto, l4) = match (be16(frame, 12), frame[ETH_HLEN] >> 4) {
        (ETH_P_IP, 4) => {
            let ihl = (frame[ETH_HLEN] & 0x0F) as usize;
            if ihl < 5 {
                return err("IPv4 IHL < 5");
            }
            if frame[ETH_HLEN + 6] & 0x3F != 0 || frame[ETH_HLEN + 7] != 0 {
                return err("NEEDS_CSUM frame that is an IPv4 fragment");
            }
            (frame[ETH_HLEN + 9], ETH_HLEN + ihl * 4)
        }
        (ETH_P_IPV6, 6) => (frame[ETH_HLEN + 6], ETH_HLEN + IPV6_HLEN),
        _ => return err("NEEDS_CSUM frame that is not IPv4 or IPv6"),
    };
    let (offset, l4_len) = match proto {
        IPPROTO_TCP => (TCP_CSUM_OFFSET, 20),
        IPPROTO_UDP => (UDP_CSUM_OFFSET, 8),
        _ => return err("NEEDS_CSUM frame that is not TCP or UDP directly over IP"),
    };
    if l4 + l4_len > n {
        return err("NEEDS_CSUM frame's TCP/UDP header beyond the frame");
    }
    Ok((l4, offset))
}

/// Validate the Ethernet/IP/TCP headers of a TCP GSO frame; return hdr_len = csum_start +
/// TCP data offset * 4 (recomputed: the kernel's hdr_len is not trusted).
fn tcp_hdr_len(frame: &[u8], gso_type: u8, cs: usize, co: usize) -> R<usize> {
    let n = frame.len();
    if co != TCP_CSUM_OFFSET {
        return err("TCP GSO frame with csum_offset != 16");
    }
    let ethertype = if n >= ETH_HLEN {
        Some(be16(frame, 12))
    } else {
        None
    };
    let l4 = match gso_type {
        GSO_TCPV4 => {
            if ethertype != Some(ETH_P_IP) || n < ETH_HLEN + 20 || frame[ETH_HLEN] >> 4 != 4 {
                return err("TCPV4 GSO frame without an IPv4 header");
            }
            let ihl = (frame[ETH_HLEN] & 0x0F) as usize;
            if ihl < 5 {
                return err("IPv4 IHL < 5");
            }
            if frame[ETH_HLEN + 9] != IPPROTO_TCP {
                return err("TCPV4 GSO frame that is not TCP");
            }
            ETH_HLEN + ihl * 4
        }
        GSO_TCPV6 => {
            if ethertype != Some(ETH_P_IPV6)
                || n < ETH_HLEN + IPV6_HLEN
                || frame[ETH_HLEN] >> 4 != 6
            {
                return err("TCPV6 GSO frame without an IPv6 header");
            }
            if frame[ETH_HLEN + 6] != IPPROTO_TCP {
                return err("TCPV6 GSO frame with extension headers or not TCP");
            }
            ETH_HLEN + IPV6_HLEN
        }
        _ => return err("unsupported gso_type"),
    };
    if cs != l4 {
        return err("csum_start does not point at the TCP header");
    }
    if l4 + 20 > n {
        return err("TCP header beyond the frame");
    }
    let doff = (frame[l4 + 12] >> 4) as usize;
    if doff < 5 {
        return err("TCP data offset < 5");
    }
    let hdr_len = l4 + doff * 4;
    if hdr_len > n {
        return err("TCP header beyond the frame");
    }
    Ok(hdr_len)
}

/// How one validated TAP read becomes inner payloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// frame | 0x00, or frame | csum_start csum_offset | 0x01
    Frame { csum: Option<(u16, u16)> },
    /// chunk_i | frame[:hdr_len] | PIECE_META | 0x02, for i in 0..count
    Pieces {
        hdr_len: usize,
        gso_size: usize,
        count: usize,
        tail: [u8; PIECE_TAIL],
    },
}

impl Plan {
    pub fn count(&self) -> usize {
        match self {
            Plan::Frame { .. } => 1,
            Plan::Pieces { count, .. } => *count,
        }
    }
}

/// Validate one TAP read (virtio_net_hdr + Ethernet frame) as `encode_outbound` does.
pub fn plan(read: &[u8], max_payload: usize) -> R<Plan> {
    let n = read.len();
    if n < VNET_HDR_LEN + ETH_HLEN {
        return err("TAP read shorter than virtio_net_hdr + Ethernet header");
    }
    let (flags, gso_type) = (read[0], read[1]);
    let gso_size = u16le(read, 4) as usize;
    let (cs, co) = (u16le(read, 6), u16le(read, 8));
    let frame = &read[VNET_HDR_LEN..];
    let frame_len = frame.len();
    if gso_type == GSO_NONE {
        if flags & F_NEEDS_CSUM != 0 {
            // What the peer's Reassembler would refuse goes no further than here.
            if (cs as usize, co as usize) != l4_csum_fields(frame)? {
                return err("NEEDS_CSUM fields do not match the frame's headers");
            }
            if frame_len + CSUM_TRAILER > max_payload {
                return err("frame larger than the inner payload budget");
            }
            return Ok(Plan::Frame {
                csum: Some((cs, co)),
            });
        }
        if frame_len + 1 > max_payload {
            return err("frame larger than the inner payload budget");
        }
        return Ok(Plan::Frame { csum: None });
    }
    if gso_type != GSO_TCPV4 && gso_type != GSO_TCPV6 {
        if gso_type & GSO_ECN != 0 {
            return err("TSO with ECN (TUN_F_TSO_ECN was not negotiated)");
        }
        return err("unsupported gso_type");
    }
    if flags & F_NEEDS_CSUM == 0 {
        return err("TCP GSO frame without NEEDS_CSUM");
    }
    let hdr_len = tcp_hdr_len(frame, gso_type, cs as usize, co as usize)?;
    if frame_len - ETH_HLEN > MAX_IP_LEN {
        return err("super-frame longer than an IP packet");
    }
    let data_len = frame_len - hdr_len;
    if data_len == 0 {
        return err("TCP GSO frame without payload");
    }
    if gso_size == 0 || gso_size == GSO_BY_FRAGS {
        return err("bad gso_size");
    }
    let count = data_len.div_ceil(gso_size);
    if count > MAX_PIECES {
        return err("super-frame of too many pieces");
    }
    if gso_size.min(data_len) + hdr_len + PIECE_TRAILER > max_payload {
        return err("a piece would exceed the inner payload budget");
    }
    let mut tail = [0u8; PIECE_TAIL];
    tail[0..2].copy_from_slice(&(count as u16).to_le_bytes());
    tail[2..4].copy_from_slice(&(hdr_len as u16).to_le_bytes());
    tail[4..6].copy_from_slice(&(gso_size as u16).to_le_bytes());
    tail[6] = gso_type;
    tail[7..9].copy_from_slice(&cs.to_le_bytes());
    tail[9..11].copy_from_slice(&co.to_le_bytes());
    tail[11] = INNER_PIECE;
    Ok(Plan::Pieces {
        hdr_len,
        gso_size,
        count,
        tail,
    })
}

/// Hand each inner payload of a read `plan` accepted to `sink`, as the parts to concatenate.
pub fn emit(read: &[u8], plan: &Plan, frame_id: u32, sink: &mut impl FnMut(&[&[u8]])) {
    let frame = &read[VNET_HDR_LEN..];
    match *plan {
        Plan::Frame { csum: None } => sink(&[frame, &[INNER_FRAME]]),
        Plan::Frame {
            csum: Some((cs, co)),
        } => {
            let mut meta = [0u8; CSUM_TRAILER];
            meta[0..2].copy_from_slice(&cs.to_le_bytes());
            meta[2..4].copy_from_slice(&co.to_le_bytes());
            meta[4] = INNER_CSUM;
            sink(&[frame, &meta])
        }
        Plan::Pieces {
            hdr_len,
            gso_size,
            tail,
            ..
        } => {
            let headers = &frame[..hdr_len];
            let fid = frame_id.to_le_bytes();
            for (i, chunk) in frame[hdr_len..].chunks(gso_size).enumerate() {
                let index = (i as u16).to_le_bytes();
                sink(&[chunk, headers, &fid, &index, &tail]);
            }
        }
    }
}

/// `encode_outbound` as a list of payloads (tests, fuzzing, the Python helper).
pub fn encode_outbound(read: &[u8], frame_id: u32, max_payload: usize) -> R<Vec<Vec<u8>>> {
    let p = plan(read, max_payload)?;
    let mut out = Vec::with_capacity(p.count());
    emit(read, &p, frame_id, &mut |parts| out.push(parts.concat()));
    Ok(out)
}

/// TAP writes, appended to one buffer: `spans` are (offset, length) into `buf`.
#[derive(Default)]
pub struct Writes {
    pub buf: Vec<u8>,
    pub spans: Vec<(usize, usize)>,
}

impl Writes {
    pub fn clear(&mut self) {
        self.buf.clear();
        self.spans.clear();
    }

    fn push(&mut self, parts: &[&[u8]]) {
        let start = self.buf.len();
        for p in parts {
            self.buf.extend_from_slice(p);
        }
        self.spans.push((start, self.buf.len() - start));
    }

    pub fn get(&self, i: usize) -> &[u8] {
        let (s, n) = self.spans[i];
        &self.buf[s..s + n]
    }
}

/// The PIECE_META fields after frame_id and index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Key {
    count: usize,
    hdr_len: usize,
    gso_size: usize,
    gso_type: u8,
    cs: usize,
    co: usize,
}

impl Key {
    fn of_piece(p: &[u8]) -> Key {
        let at = p.len() - PIECE_TRAILER;
        Key {
            count: u16le(p, at + 6) as usize,
            hdr_len: u16le(p, at + 8) as usize,
            gso_size: u16le(p, at + 10) as usize,
            gso_type: p[at + 12],
            cs: u16le(p, at + 13) as usize,
            co: u16le(p, at + 15) as usize,
        }
    }
}

fn words_sum(b: &[u8]) -> u64 {
    b.chunks(2)
        .map(|w| u16::from_be_bytes([w[0], w[1]]) as u64)
        .sum()
}

/// A non-zero sum folded to 1..=0xFFFF (2**16 ≡ 1 mod 0xFFFF; RFC 1071).
fn fold(sum: u64) -> u16 {
    match (sum % 0xFFFF) as u16 {
        0 => 0xFFFF,
        s => s,
    }
}

/// Write the pieces (index, chunk) of one super-frame that arrived as valid TAP writes: a
/// run of consecutive pieces becomes one smaller super-frame, a lone piece one segment (the
/// IPv4 id/length/checksum or IPv6 length, TCP seq, FIN/PSH on the last piece only, and the
/// pseudo-header sum of the run's length in the NEEDS_CSUM field). `headers` and `key` were
/// validated by `tcp_hdr_len`, so every offset is in range.
fn rebuild_segments(headers: &[u8], key: &Key, pieces: &[(usize, &[u8])], out: &mut Writes) {
    let Key {
        count,
        hdr_len,
        gso_size,
        gso_type,
        cs,
        co,
    } = *key;
    let vnet_one = vnet(F_NEEDS_CSUM, GSO_NONE, 0, 0, cs as u16, co as u16);
    let vnet_run = vnet(
        F_NEEDS_CSUM,
        gso_type,
        hdr_len as u16,
        gso_size as u16,
        cs as u16,
        co as u16,
    );
    let seq0 = u32::from_be_bytes([
        headers[cs + 4],
        headers[cs + 5],
        headers[cs + 6],
        headers[cs + 7],
    ]);
    let last_flags = headers[cs + 13];
    let mid_flags = last_flags & !(TCP_FIN | TCP_PSH);
    let tcp_hdr = hdr_len - cs;
    let v4 = gso_type == GSO_TCPV4;
    let (ip_sum0, pseudo0, id0) = if v4 {
        let sum =
            words_sum(&headers[14..16]) + words_sum(&headers[20..24]) + words_sum(&headers[26..cs]);
        (
            sum,
            words_sum(&headers[26..34]) + IPPROTO_TCP as u64,
            be16(headers, 18),
        )
    } else {
        (0, words_sum(&headers[22..54]) + IPPROTO_TCP as u64, 0)
    };
    let mut i = 0;
    while i < pieces.len() {
        let start = pieces[i].0;
        let mut j = i + 1;
        while j < pieces.len() && pieces[j].0 == start + (j - i) {
            j += 1;
        }
        let run = &pieces[i..j];
        let payload_len: usize = run.iter().map(|(_, c)| c.len()).sum();
        let last = start + run.len() - 1;
        let tcp_len = tcp_hdr + payload_len;
        let at = out.buf.len();
        let b = &mut out.buf;
        b.extend_from_slice(if run.len() == 1 { &vnet_one } else { &vnet_run });
        if v4 {
            let total = (cs - ETH_HLEN + tcp_len) as u64;
            let ip_id = id0.wrapping_add(start as u16);
            let ip_sum = fold(ip_sum0 + total + ip_id as u64);
            b.extend_from_slice(&headers[..16]);
            b.extend_from_slice(&(total as u16).to_be_bytes());
            b.extend_from_slice(&ip_id.to_be_bytes());
            b.extend_from_slice(&headers[20..24]);
            b.extend_from_slice(&(0xFFFF - ip_sum).to_be_bytes());
            b.extend_from_slice(&headers[26..cs]);
        } else {
            b.extend_from_slice(&headers[..18]);
            b.extend_from_slice(&(tcp_len as u16).to_be_bytes());
            b.extend_from_slice(&headers[20..cs]);
        }
        b.extend_from_slice(&headers[cs..cs + 4]);
        let seq = seq0.wrapping_add((start as u32).wrapping_mul(gso_size as u32));
        b.extend_from_slice(&seq.to_be_bytes());
        b.extend_from_slice(&headers[cs + 8..cs + 13]);
        b.push(if last == count - 1 {
            last_flags
        } else {
            mid_flags
        });
        b.extend_from_slice(&headers[cs + 14..cs + 16]);
        b.extend_from_slice(&fold(pseudo0 + tcp_len as u64).to_be_bytes());
        b.extend_from_slice(&headers[cs + 18..hdr_len]);
        for (_, c) in run {
            b.extend_from_slice(c);
        }
        out.spans.push((at, out.buf.len() - at));
        i = j;
    }
}

/// Counters of one Reassembler, as proto/offload.py names them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub frames_whole: u64,
    pub frames_partial: u64,
    pub segments_rebuilt: u64,
    pub pieces_late: u64,
}

/// Inner payloads from one peer -> TAP writes. At most one super-frame is pending.
#[derive(Default)]
pub struct Reassembler {
    pub counters: Counters,
    newest: Option<u32>,
    fid: u32,
    key: Option<Key>,
    headers: Vec<u8>,
    last_max: usize,
    tail: [u8; PIECE_TAIL],
    /// Chunk i at i * gso_size; `lens[i]` 0 while missing.
    data: Vec<u8>,
    lens: Vec<usize>,
    have: usize,
}

impl Reassembler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Pieces held for the pending super-frame (0: nothing to flush).
    pub fn pending(&self) -> usize {
        self.have
    }

    /// Take one opened inner payload (kind byte last); append the TAP writes it completes.
    /// A refused payload leaves the pending frame as it was.
    pub fn push_untrusted(&mut self, p: &[u8], out: &mut Writes) -> R<()> {
        let n = p.len();
        if n == 0 {
            return Ok(()); // keepalive
        }
        match p[n - 1] {
            INNER_PIECE => {
                if n < PIECE_TRAILER {
                    return err("piece shorter than its trailer");
                }
                let fid = u32le(p, n - PIECE_TRAILER);
                let index = u16le(p, n - PIECE_TRAILER + 4) as usize;
                if self.have > 0 && fid == self.fid {
                    return self.pending_piece(p, index, out);
                }
                self.other_piece(p, fid, index, out)
            }
            INNER_FRAME => {
                if n - 1 < ETH_HLEN {
                    return err("inner frame shorter than an Ethernet header");
                }
                out.push(&[&[0u8; VNET_HDR_LEN], &p[..n - 1]]);
                Ok(())
            }
            INNER_CSUM => {
                if n < CSUM_TRAILER + ETH_HLEN {
                    return err("inner frame shorter than an Ethernet header");
                }
                let frame_len = n - CSUM_TRAILER;
                let (cs, co) = (u16le(p, frame_len), u16le(p, frame_len + 2));
                if (cs as usize, co as usize) != l4_csum_fields(&p[..frame_len])? {
                    return err("NEEDS_CSUM fields do not match the frame's headers");
                }
                out.push(&[&vnet(F_NEEDS_CSUM, GSO_NONE, 0, 0, cs, co), &p[..frame_len]]);
                Ok(())
            }
            _ => err("unknown inner payload kind"),
        }
    }

    /// Hot path: a piece of the pending frame, whose first piece was validated. Its meta
    /// after the index (and its kind) must be the frame's, byte for byte.
    fn pending_piece(&mut self, p: &[u8], index: usize, out: &mut Writes) -> R<()> {
        let n = p.len();
        if p[n - PIECE_TAIL..] != self.tail {
            return err("piece disagrees with the other pieces of its frame");
        }
        let key = self.key.expect("a pending frame has a key");
        let chunk_len = (n - PIECE_TRAILER) as isize - key.hdr_len as isize;
        if index >= key.count {
            return err("piece index out of range");
        }
        if index == key.count - 1 {
            if !(0 < chunk_len && chunk_len as usize <= self.last_max) {
                return err("last piece size does not match its frame");
            }
        } else if chunk_len != key.gso_size as isize {
            return err("piece size does not match gso_size");
        }
        let chunk_len = chunk_len as usize;
        if p[chunk_len..n - PIECE_TRAILER] != self.headers[..] {
            return err("piece headers differ from its frame's");
        }
        if self.lens[index] != 0 {
            return err("duplicate piece");
        }
        self.store(index, &p[..chunk_len]);
        if self.have == key.count {
            self.complete(out);
        }
        Ok(())
    }

    fn store(&mut self, index: usize, chunk: &[u8]) {
        let gso_size = self.key.expect("pending").gso_size;
        let at = index * gso_size;
        self.data[at..at + chunk.len()].copy_from_slice(chunk);
        self.lens[index] = chunk.len();
        self.have += 1;
    }

    /// A piece that starts a new frame, or a late one: validated fully on its own.
    fn other_piece(&mut self, p: &[u8], fid: u32, index: usize, out: &mut Writes) -> R<()> {
        let key = Key::of_piece(p);
        let n = p.len();
        let chunk_len = (n - PIECE_TRAILER) as isize - key.hdr_len as isize;
        if chunk_len <= 0 {
            return err("piece without payload");
        }
        let chunk_len = chunk_len as usize;
        if !(0 < key.count && key.count <= MAX_PIECES) || index >= key.count {
            return err("piece index/count out of range");
        }
        if key.gso_size == 0 || key.gso_size == GSO_BY_FRAGS {
            return err("bad gso_size");
        }
        // The last chunk must keep the whole frame one IP packet (and be at most gso_size).
        let before_last =
            key.hdr_len as i64 - ETH_HLEN as i64 + ((key.count - 1) * key.gso_size) as i64;
        let last_max = (key.gso_size as i64).min(MAX_IP_LEN as i64 - before_last);
        if index == key.count - 1 {
            if chunk_len as i64 > last_max {
                return err("last piece size does not match its frame");
            }
        } else if chunk_len != key.gso_size || last_max <= 0 {
            return err("piece size does not match gso_size");
        }
        if key.gso_type != GSO_TCPV4 && key.gso_type != GSO_TCPV6 {
            return err("piece with an unsupported gso_type");
        }
        let headers = &p[chunk_len..chunk_len + key.hdr_len];
        if tcp_hdr_len(headers, key.gso_type, key.cs, key.co)? != key.hdr_len {
            return err("piece hdr_len does not match its TCP header");
        }
        let chunk = &p[..chunk_len];
        if let Some(newest) = self.newest {
            let ahead = fid.wrapping_sub(newest);
            if ahead == 0 || ahead >= 1 << 31 {
                // A frame already completed or flushed: this piece goes out on its own.
                rebuild_segments(headers, &key, &[(index, chunk)], out);
                self.counters.pieces_late += 1;
                self.counters.segments_rebuilt += 1;
                return Ok(());
            }
        }
        self.flush(out);
        self.newest = Some(fid);
        self.fid = fid;
        self.key = Some(key);
        self.tail.copy_from_slice(&p[n - PIECE_TAIL..]);
        self.headers.clear();
        self.headers.extend_from_slice(headers);
        self.last_max = last_max as usize;
        self.data.clear();
        self.data.resize(key.count * key.gso_size, 0);
        self.lens.clear();
        self.lens.resize(key.count, 0);
        self.store(index, chunk);
        if key.count == 1 {
            self.complete(out);
        }
        Ok(())
    }

    fn complete(&mut self, out: &mut Writes) {
        let key = self.key.expect("pending");
        let total = (key.count - 1) * key.gso_size + self.lens[key.count - 1];
        let head = vnet(
            F_NEEDS_CSUM,
            key.gso_type,
            key.hdr_len as u16,
            key.gso_size as u16,
            key.cs as u16,
            key.co as u16,
        );
        out.push(&[&head, &self.headers, &self.data[..total]]);
        self.counters.frames_whole += 1;
        self.have = 0;
    }

    /// Flush, then forget the frame ids seen (the peer's session changed).
    pub fn reset(&mut self, out: &mut Writes) {
        self.flush(out);
        self.newest = None;
    }

    /// Write the pending incomplete super-frame as the segments of the pieces that arrived.
    pub fn flush(&mut self, out: &mut Writes) {
        if self.have == 0 {
            return;
        }
        let key = self.key.expect("pending");
        let pieces: Vec<(usize, &[u8])> = self
            .lens
            .iter()
            .enumerate()
            .filter(|(_, &len)| len != 0)
            .map(|(i, &len)| (i, &self.data[i * key.gso_size..i * key.gso_size + len]))
            .collect();
        rebuild_segments(&self.headers, &key, &pieces, out);
        self.counters.segments_rebuilt += pieces.len() as u64;
        self.counters.frames_partial += 1;
        self.have = 0;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn rfc1071(data: &[u8]) -> u32 {
        let mut sum: u32 = data
            .chunks(2)
            .map(|w| u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]) as u32)
            .sum();
        while sum >> 16 != 0 {
            sum = (sum & 0xFFFF) + (sum >> 16);
        }
        sum
    }

    /// A TAP read as the kernel hands over a TSO super-frame (NEEDS_CSUM, pseudo-header sum
    /// in the TCP checksum field); tests/unit/test_offload.py's build_read.
    pub(crate) fn build_read(data_len: usize, v6: bool, gso_size: u16, flags: u8) -> Vec<u8> {
        let data: Vec<u8> = (0..data_len).map(|i| (i * 7 + 3) as u8).collect();
        let opts = [1u8, 1, 8, 10, 0, 1, 2, 3, 4, 5, 6, 7];
        let tcp_len = 20 + opts.len() + data_len;
        let mut f = Vec::new();
        f.extend_from_slice(&[2, 0xaa, 0xbb, 0xcc, 0xdd, 2, 2, 0xaa, 0xbb, 0xcc, 0xdd, 1]);
        let (src, dst): (Vec<u8>, Vec<u8>);
        if v6 {
            f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&(tcp_len as u16).to_be_bytes());
            f.extend_from_slice(&[6, 64]);
            src = [0xfd; 16].to_vec();
            dst = [0xfe; 16].to_vec();
        } else {
            f.extend_from_slice(&ETH_P_IP.to_be_bytes());
            let total = (20 + tcp_len) as u16;
            f.extend_from_slice(&[0x45, 0]);
            f.extend_from_slice(&total.to_be_bytes());
            f.extend_from_slice(&[0xFF, 0xF0, 0x40, 0, 64, 6, 0, 0]);
            src = vec![10, 77, 0, 2];
            dst = vec![10, 77, 0, 3];
        }
        f.extend_from_slice(&src);
        f.extend_from_slice(&dst);
        if !v6 {
            let c = 0xFFFF - rfc1071(&f[14..34]) as u16;
            f[24..26].copy_from_slice(&c.to_be_bytes());
        }
        let cs = f.len();
        let mut pseudo = [src.clone(), dst.clone()].concat();
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&(tcp_len as u16).to_be_bytes());
        f.extend_from_slice(&[0x9c, 0x40, 0x14, 0x51, 0xFF, 0xFF, 0xF0, 0, 1, 2, 3, 4]);
        f.push((((20 + opts.len()) / 4) << 4) as u8);
        f.push(flags);
        f.extend_from_slice(&[2, 0]);
        f.extend_from_slice(&(rfc1071(&pseudo) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&opts);
        let hdr_len = f.len();
        f.extend_from_slice(&data);
        let gso_type = if v6 { GSO_TCPV6 } else { GSO_TCPV4 };
        let mut read = vnet(
            F_NEEDS_CSUM,
            gso_type,
            hdr_len as u16,
            gso_size,
            cs as u16,
            16,
        )
        .to_vec();
        read.extend_from_slice(&f);
        read
    }

    fn reassemble(r: &mut Reassembler, payloads: &[Vec<u8>]) -> Writes {
        let mut out = Writes::default();
        for p in payloads {
            r.push_untrusted(p, &mut out).unwrap();
        }
        out
    }

    #[test]
    fn super_frames_round_trip_byte_identical() {
        for v6 in [false, true] {
            for data_len in [1, 100, 1348, 1349, 45 * 1348, 63_000] {
                let mss = if v6 { 1328 } else { 1348 };
                let read = build_read(data_len, v6, mss, 0x18);
                let payloads = encode_outbound(&read, 7, DEFAULT_MAX_PAYLOAD).unwrap();
                assert_eq!(payloads.len(), data_len.div_ceil(mss as usize));
                assert!(payloads.iter().all(|p| p.len() <= DEFAULT_MAX_PAYLOAD));
                let mut r = Reassembler::new();
                let mut shuffled = payloads.clone();
                shuffled.reverse();
                let out = reassemble(&mut r, &shuffled);
                assert_eq!(out.spans.len(), 1);
                assert_eq!(out.get(0), &read[..]);
                assert_eq!(r.counters.frames_whole, 1);
                assert_eq!(r.pending(), 0);
            }
        }
    }

    #[test]
    fn lost_middle_piece_flushes_two_valid_runs() {
        for v6 in [false, true] {
            let read = build_read(20 * 1000, v6, 1000, 0x19);
            let mut payloads = encode_outbound(&read, 9, DEFAULT_MAX_PAYLOAD).unwrap();
            payloads.remove(5);
            let mut r = Reassembler::new();
            let mut out = reassemble(&mut r, &payloads);
            assert_eq!(out.spans.len(), 0);
            assert_eq!(r.pending(), 19);
            r.flush(&mut out);
            assert_eq!(out.spans.len(), 2);
            assert_eq!(r.counters.frames_partial, 1);
            assert_eq!(r.counters.segments_rebuilt, 19);
            let cs = if v6 { 54 } else { 34 };
            for (i, first) in [(0usize, 0usize), (1, 6)] {
                let w = out.get(i);
                let f = &w[VNET_HDR_LEN..];
                if !v6 {
                    assert_eq!(rfc1071(&f[14..cs]), 0xFFFF, "IPv4 header checksum");
                    assert_eq!(be16(f, 16) as usize, f.len() - 14);
                    assert_eq!(be16(f, 18), 0xFFF0u16.wrapping_add(first as u16));
                } else {
                    assert_eq!(be16(f, 18) as usize, f.len() - cs);
                }
                let seq = u32::from_be_bytes([f[cs + 4], f[cs + 5], f[cs + 6], f[cs + 7]]);
                assert_eq!(seq, 0xFFFF_F000u32.wrapping_add(first as u32 * 1000));
                // FIN|PSH only on the run that holds the last piece.
                assert_eq!(f[cs + 13], if i == 1 { 0x19 } else { 0x10 });
            }
            // A late piece of the flushed frame goes out on its own.
            let late = encode_outbound(&read, 9, DEFAULT_MAX_PAYLOAD).unwrap()[5].clone();
            let mut more = Writes::default();
            r.push_untrusted(&late, &mut more).unwrap();
            assert_eq!(more.spans.len(), 1);
            assert_eq!(more.get(0)[1], GSO_NONE);
            assert_eq!(r.counters.pieces_late, 1);
        }
    }

    #[test]
    fn refused_pieces_leave_the_pending_frame() {
        let read = build_read(6 * 1348 - 10, false, 1348, 0x18);
        let good = encode_outbound(&read, 5, DEFAULT_MAX_PAYLOAD).unwrap();
        let mut r = Reassembler::new();
        reassemble(&mut r, &good[..1]);
        let mut bad = vec![good[0].clone()]; // duplicate
        let mut p = good[1].clone();
        let n = p.len();
        p[n - 2] ^= 1; // csum_offset in the tail
        bad.push(p);
        let mut p = good[1].clone();
        p[1400] ^= 1; // inside the header block
        bad.push(p);
        bad.push(good[1][..100].to_vec()); // short
        bad.push(vec![7]);
        bad.push(vec![0; 14]);
        let mut out = Writes::default();
        for b in &bad {
            assert!(r.push_untrusted(b, &mut out).is_err());
            assert_eq!(r.pending(), 1);
        }
        let out = reassemble(&mut r, &good[1..]);
        assert_eq!(out.get(0), &read[..]);
    }

    #[test]
    fn reset_forgets_frame_ids_and_old_ids_are_late() {
        let read = build_read(4 * 1348, false, 1348, 0x18);
        let mut r = Reassembler::new();
        let at = |fid| encode_outbound(&read, fid, DEFAULT_MAX_PAYLOAD).unwrap();
        assert_eq!(reassemble(&mut r, &at(1000)).spans.len(), 1);
        let old = reassemble(&mut r, &at(1000u32.wrapping_sub(1 << 31) + 1)[..1]);
        assert_eq!((old.spans.len(), r.counters.pieces_late), (1, 1));
        let mut out = Writes::default();
        r.reset(&mut out);
        assert_eq!(reassemble(&mut r, &at(0)).spans.len(), 1);
        assert_eq!(r.counters.pieces_late, 1);
    }

    #[test]
    fn refused_reads() {
        let read = build_read(20_000, false, 1348, 0x18);
        let mut ecn = read.clone();
        ecn[1] |= GSO_ECN;
        let mut no_csum = read.clone();
        no_csum[0] = 0;
        let mut gso0 = read.clone();
        gso0[4..6].copy_from_slice(&[0, 0]);
        let mut udp = read.clone();
        udp[VNET_HDR_LEN + 23] = 17;
        for bad in [
            &read[..23],
            &ecn,
            &no_csum,
            &gso0,
            &udp,
            &read[..VNET_HDR_LEN + 66],
        ] {
            assert!(plan(bad, DEFAULT_MAX_PAYLOAD).is_err());
        }
        assert!(plan(&build_read(64_000, false, 1420, 0x18), DEFAULT_MAX_PAYLOAD).is_err());
        let mut small = vec![0u8; 10];
        small.extend_from_slice(&[0u8; 1440]); // + the kind byte: one over the budget
        assert!(plan(&small, DEFAULT_MAX_PAYLOAD).is_err());
        assert!(plan(&small[..10 + 1439], DEFAULT_MAX_PAYLOAD).is_ok());
    }
}
