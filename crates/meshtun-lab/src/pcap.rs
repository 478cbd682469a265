//! Just enough of the pcap file format (what `tcpdump -w` writes) to check
//! what crossed a host's wire: Ethernet frames carrying IPv4 UDP or TCP.

use std::io;
use std::net::Ipv4Addr;
use std::path::Path;

/// Link type of Ethernet captures (`LINKTYPE_ETHERNET`).
const LINKTYPE_ETHERNET: u32 = 1;

/// An IPv4 packet seen on the wire, reduced to what the lab asserts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// IP protocol number (6 TCP, 17 UDP, 1 ICMP, ...).
    pub protocol: u8,
    /// Source port, for TCP and UDP.
    pub src_port: Option<u16>,
    /// Destination port, for TCP and UDP.
    pub dst_port: Option<u16>,
    /// The transport payload (UDP datagram body or TCP segment data).
    pub payload: Vec<u8>,
}

/// What a capture file held.
#[derive(Debug, Default)]
pub struct Capture {
    /// Every IPv4 packet, in capture order.
    pub packets: Vec<Packet>,
    /// Frames that were not IPv4 (ARP, IPv6 neighbour discovery, ...).
    pub other_frames: usize,
    /// Records cut short by the snapshot length or a truncated file.
    pub truncated: usize,
}

/// Reads a pcap file written by tcpdump on an Ethernet (veth) interface.
pub fn read(path: &Path) -> io::Result<Capture> {
    let bytes = std::fs::read(path)?;
    parse(&bytes).map_err(|reason| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {reason}", path.display()),
        )
    })
}

/// Parses pcap bytes.
pub fn parse(bytes: &[u8]) -> Result<Capture, String> {
    let header = bytes.get(..24).ok_or("shorter than a pcap header")?;
    let magic = [header[0], header[1], header[2], header[3]];
    let little = match magic {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        _ => return Err(format!("not a pcap file (magic {magic:02x?})")),
    };
    let u32_at = |slice: &[u8], at: usize| -> u32 {
        let word = [slice[at], slice[at + 1], slice[at + 2], slice[at + 3]];
        if little {
            u32::from_le_bytes(word)
        } else {
            u32::from_be_bytes(word)
        }
    };
    let link_type = u32_at(header, 20);
    if link_type != LINKTYPE_ETHERNET {
        return Err(format!("link type {link_type} is not Ethernet"));
    }
    let mut capture = Capture::default();
    let mut rest = &bytes[24..];
    while rest.len() >= 16 {
        let captured = u32_at(rest, 8) as usize;
        let original = u32_at(rest, 12) as usize;
        let Some(frame) = rest.get(16..16 + captured) else {
            capture.truncated += 1;
            break;
        };
        if captured < original {
            capture.truncated += 1;
        }
        match ipv4(frame) {
            Some(packet) => capture.packets.push(packet),
            None => capture.other_frames += 1,
        }
        rest = &rest[16 + captured..];
    }
    Ok(capture)
}

fn ipv4(frame: &[u8]) -> Option<Packet> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    if ethertype != 0x0800 {
        return None;
    }
    let ip = frame.get(14..)?;
    let header_len = usize::from(ip.first()? & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
    let protocol = *ip.get(9)?;
    let src = Ipv4Addr::new(*ip.get(12)?, *ip.get(13)?, *ip.get(14)?, *ip.get(15)?);
    let dst = Ipv4Addr::new(*ip.get(16)?, *ip.get(17)?, *ip.get(18)?, *ip.get(19)?);
    let body = ip.get(header_len..total_len.min(ip.len()))?;
    let (src_port, dst_port, payload) = match protocol {
        17 => {
            let ports = body.get(..8)?;
            (Some(port(ports, 0)), Some(port(ports, 2)), body.get(8..)?)
        }
        6 => {
            let offset = usize::from(body.get(12)? >> 4) * 4;
            (
                Some(port(body, 0)),
                Some(port(body, 2)),
                body.get(offset..)?,
            )
        }
        _ => (None, None, body),
    };
    Some(Packet {
        src,
        dst,
        protocol,
        src_port,
        dst_port,
        payload: payload.to_vec(),
    })
}

fn port(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp_frame(payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&[0x08, 0x00]);
        let total = 20 + 8 + payload.len();
        let mut ip = vec![
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            0,
            0,
            0,
            64,
            17,
            0,
            0,
        ];
        ip.extend_from_slice(&[198, 18, 0, 11, 198, 18, 0, 12]);
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&[0x11, 0x51, 0x11, 0x51, 0, (8 + payload.len()) as u8, 0, 0]);
        frame.extend_from_slice(payload);
        frame
    }

    fn pcap(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut bytes = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
        bytes.extend_from_slice(&[0; 8]);
        bytes.extend_from_slice(&65535u32.to_le_bytes());
        bytes.extend_from_slice(&1u32.to_le_bytes());
        for frame in frames {
            bytes.extend_from_slice(&[0; 8]);
            bytes.extend_from_slice(&(frame.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&(frame.len() as u32).to_le_bytes());
            bytes.extend_from_slice(frame);
        }
        bytes
    }

    #[test]
    fn reads_udp_packets() {
        let capture = parse(&pcap(&[udp_frame(b"hello"), vec![0u8; 20]])).unwrap();
        assert_eq!(capture.packets.len(), 1);
        assert_eq!(capture.other_frames, 1);
        let packet = &capture.packets[0];
        assert_eq!(packet.protocol, 17);
        assert_eq!(packet.src, Ipv4Addr::new(198, 18, 0, 11));
        assert_eq!(packet.dst_port, Some(4433));
        assert_eq!(packet.payload, b"hello");
    }

    #[test]
    fn rejects_garbage_and_tolerates_truncation() {
        assert!(parse(b"not a capture at all, not even close").is_err());
        let mut bytes = pcap(&[udp_frame(b"hello")]);
        bytes.truncate(bytes.len() - 2);
        let capture = parse(&bytes).unwrap();
        assert_eq!(capture.truncated, 1);
        assert!(capture.packets.is_empty());
    }
}
