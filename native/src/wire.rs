//! The bytes on the wire, as `ipop_trio/proto/wire.py` and `proto/offload.py` draw them.
//! Only constants and small readers live here; the Python modules are the specification.

/// Data datagram: type(1) pad(3) receiver_index(u32 le) counter(u64 le).
pub const DATA_HEADER_SIZE: usize = 16;
pub const TAG_SIZE: usize = 16;
pub const DATA_SECURE: u8 = 0xA4;
pub const DATA_PLAIN: u8 = 0xA5;

/// WireGuard's REJECT_AFTER_MESSAGES (whitepaper §6.1): no counter at or past it is used.
pub const REJECT_AFTER_MESSAGES: u64 = u64::MAX - (1 << 13); // 2**64 - 2**13 - 1

/// Inner payload kinds (the last byte of an opened payload).
pub const INNER_FRAME: u8 = 0;
pub const INNER_CSUM: u8 = 1;
pub const INNER_PIECE: u8 = 2;
/// csum_start, csum_offset (u16 le each) + kind.
pub const CSUM_TRAILER: usize = 5;
/// PIECE_META "<IHHHHBHH" (17 bytes) + kind.
pub const PIECE_TRAILER: usize = 18;
/// The part of a piece's trailer after frame_id and index, kind included: equal in every
/// piece of one super-frame.
pub const PIECE_TAIL: usize = 12;

/// struct virtio_net_hdr (legacy, little endian here).
pub const VNET_HDR_LEN: usize = 10;
pub const F_NEEDS_CSUM: u8 = 1;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_ECN: u8 = 0x80;
pub const GSO_BY_FRAGS: usize = 0xFFFF;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const UDP_CSUM_OFFSET: usize = 6;
pub const IPV6_HLEN: usize = 40;
pub const TCP_CSUM_OFFSET: usize = 16;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_PSH: u8 = 0x08;
pub const MAX_IP_LEN: usize = 0xFFFF;
pub const MAX_PIECES: usize = 128;
pub const DEFAULT_MAX_PAYLOAD: usize = 1440;

/// UDP GSO limits of one sendmsg (net/udp.py): segments, and bytes in all.
pub const UDP_MAX_SEGMENTS: usize = 64;
pub const GSO_MAX_BYTES: usize = 65535 - 28 - 8;

/// Where a datagram goes by its first byte (RFC 7983 ranges, proto/wire.py's DEMUX).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Demux {
    Stun,
    ChannelData,
    Handshake,
    Data,
    Drop,
}

pub fn demux(first: u8) -> Demux {
    match first {
        0..=3 => Demux::Stun,
        64..=79 => Demux::ChannelData,
        0xA1..=0xA3 => Demux::Handshake,
        DATA_SECURE | DATA_PLAIN => Demux::Data,
        _ => Demux::Drop,
    }
}

pub fn u16le(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

pub fn u32le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub fn u64le(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

pub fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// One virtio_net_hdr, packed.
pub fn vnet(flags: u8, gso_type: u8, hdr_len: u16, gso_size: u16, cs: u16, co: u16) -> [u8; 10] {
    let mut h = [0u8; 10];
    h[0] = flags;
    h[1] = gso_type;
    h[2..4].copy_from_slice(&hdr_len.to_le_bytes());
    h[4..6].copy_from_slice(&gso_size.to_le_bytes());
    h[6..8].copy_from_slice(&cs.to_le_bytes());
    h[8..10].copy_from_slice(&co.to_le_bytes());
    h
}

/// GSO runs of datagram sizes, as net/udp.py's `_runs`: (first index, count, segment size,
/// total bytes). A run is equal sizes, optionally closed by one shorter datagram, at most
/// `max_segments` long and `max_bytes` in total.
pub fn gso_runs(
    sizes: &[usize],
    max_segments: usize,
    max_bytes: usize,
) -> Vec<(usize, usize, usize, usize)> {
    let mut runs = Vec::new();
    let (mut i, n) = (0, sizes.len());
    while i < n {
        let seg = sizes[i];
        let mut j = i + 1;
        let mut total = seg;
        let limit = max_segments.min((max_bytes / seg.max(1)).max(1));
        while j < n && j - i < limit && sizes[j] == seg {
            total += seg;
            j += 1;
        }
        if j < n && j - i < limit && sizes[j] < seg {
            total += sizes[j];
            j += 1;
        }
        runs.push((i, j - i, seg, total));
        i = j;
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demux_table() {
        assert_eq!(demux(0), Demux::Stun);
        assert_eq!(demux(3), Demux::Stun);
        assert_eq!(demux(4), Demux::Drop);
        assert_eq!(demux(64), Demux::ChannelData);
        assert_eq!(demux(79), Demux::ChannelData);
        assert_eq!(demux(0xA1), Demux::Handshake);
        assert_eq!(demux(0xA3), Demux::Handshake);
        assert_eq!(demux(0xA4), Demux::Data);
        assert_eq!(demux(0xA5), Demux::Data);
        assert_eq!(demux(0xA6), Demux::Drop);
    }

    #[test]
    fn reject_limit_is_wireguards() {
        assert_eq!(REJECT_AFTER_MESSAGES as u128, (1u128 << 64) - (1 << 13) - 1);
    }

    #[test]
    fn runs_as_udp_py() {
        assert_eq!(
            gso_runs(&[100, 100, 50, 100], 64, 65499),
            vec![(0, 3, 100, 250), (3, 1, 100, 100)]
        );
        assert_eq!(
            gso_runs(&[100, 200], 64, 65499),
            vec![(0, 1, 100, 100), (1, 1, 200, 200)]
        );
        let many = vec![1000; 70];
        assert_eq!(
            gso_runs(&many, 64, 65499),
            vec![(0, 64, 1000, 64000), (64, 6, 1000, 6000)]
        );
        assert_eq!(
            gso_runs(&[40000, 40000], 64, 65499),
            vec![(0, 1, 40000, 40000), (1, 1, 40000, 40000)]
        );
    }
}
