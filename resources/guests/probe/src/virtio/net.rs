//! virtio-net through veil's loopback backend, which hands every frame the
//! guest transmits back to its receive queue: send frames, receive each
//! one back, compare. `Rig` keeps receive buffers posted and several
//! transmissions in flight, through virtio-drivers' raw driver
//! (`VirtIONetRaw`: `transmit_begin`/`poll_transmit`/`transmit_complete`
//! and the same for receive); the benchmark uses it too.
//!
//! A frame: destination = the device's MAC, source = the device's MAC,
//! EtherType 0x88B5 (local experimental), a u32 sequence number and a u16
//! length (little-endian), then bytes derived from both.

use alloc::vec;
use alloc::vec::Vec;
use core::hint::spin_loop;

use virtio_drivers::device::net::VirtIONetRaw;

use super::transport::Probed;
use super::{annotate, check_features, error_name, init_failed, Buf, Device, TIMEOUT};
use crate::hal::ProbeHal;
use crate::time::rdtsc;

/// Descriptors per queue.
const QUEUE: usize = 64;
/// Receive buffers kept posted (one descriptor each).
const RX_SLOTS: usize = 32;
/// Transmissions in flight (one descriptor each: header and frame in one
/// buffer).
pub const TX_SLOTS: usize = 16;
/// Receive buffer: virtio-drivers wants at least 1526 bytes.
const RX_LEN: usize = 2048;
/// Longest frame sent: a 1500-byte MTU plus the Ethernet header.
pub const MAX_FRAME: usize = 1514;
/// Shortest: Ethernet header, sequence number, length.
pub const MIN_FRAME: usize = 20;
/// Frames of the `basic` workload.
const FRAMES: u32 = 64;
const ETHERTYPE: [u8; 2] = [0x88, 0xB5];
const NONE: u8 = u8::MAX;

pub type Net = VirtIONetRaw<ProbeHal, Probed, QUEUE>;

fn payload_byte(seq: u32, len: usize, j: usize) -> u8 {
    (seq.wrapping_mul(31) as usize ^ len.wrapping_mul(7) ^ j.wrapping_mul(13)) as u8
}

/// Frame number `seq` of `len` bytes into `out`.
fn build(mac: [u8; 6], seq: u32, len: usize, out: &mut [u8]) {
    out[0..6].copy_from_slice(&mac);
    out[6..12].copy_from_slice(&mac);
    out[12..14].copy_from_slice(&ETHERTYPE);
    out[14..18].copy_from_slice(&seq.to_le_bytes());
    out[18..20].copy_from_slice(&(len as u16).to_le_bytes());
    for (j, b) in out[20..len].iter_mut().enumerate() {
        *b = payload_byte(seq, len, j);
    }
}

/// The sequence number of a received frame, if it is one of ours, whole.
fn check(mac: [u8; 6], frame: &[u8]) -> Option<u32> {
    if frame.len() < MIN_FRAME || frame[0..6] != mac || frame[6..12] != mac || frame[12..14] != ETHERTYPE {
        return None;
    }
    let seq = u32::from_le_bytes(frame[14..18].try_into().unwrap());
    let len = u16::from_le_bytes(frame[18..20].try_into().unwrap()) as usize;
    let ok = len == frame.len()
        && frame[20..]
            .iter()
            .enumerate()
            .all(|(j, &b)| b == payload_byte(seq, len, j));
    ok.then_some(seq)
}

pub struct Rig {
    net: Net,
    mac: [u8; 6],
    rx: Vec<Buf>,
    rx_by_token: [u8; QUEUE],
    tx: Vec<Buf>,
    tx_len: [usize; TX_SLOTS],
    tx_by_token: [u8; QUEUE],
    tx_free: Vec<usize>,
}

/// What a run moved.
#[derive(Default)]
pub struct Moved {
    pub frames: u64,
    /// Frame bytes (without the virtio-net header), each way.
    pub bytes: u64,
}

impl Rig {
    /// Set up the driver and post every receive buffer.
    pub fn new(transport: Probed) -> Result<Rig, virtio_drivers::Error> {
        let net = Net::new(transport)?;
        let mac = net.mac_address();
        let mut rig = Rig {
            net,
            mac,
            rx: (0..RX_SLOTS).map(|_| Buf::new(RX_LEN)).collect(),
            rx_by_token: [NONE; QUEUE],
            tx: (0..TX_SLOTS).map(|_| Buf::new(RX_LEN)).collect(),
            tx_len: [0; TX_SLOTS],
            tx_by_token: [NONE; QUEUE],
            tx_free: (0..TX_SLOTS).rev().collect(),
        };
        for i in 0..RX_SLOTS {
            rig.post_rx(i)?;
        }
        Ok(rig)
    }

    fn post_rx(&mut self, i: usize) -> Result<(), virtio_drivers::Error> {
        // SAFETY: the buffer stays put and untouched until its token comes
        // back through poll_receive and receive_complete.
        let token = unsafe { self.net.receive_begin(self.rx[i].as_mut_slice())? };
        *self
            .rx_by_token
            .get_mut(token as usize)
            .ok_or(virtio_drivers::Error::WrongToken)? = i as u8;
        Ok(())
    }

    /// Send `count` frames, frame `n` being `len(n)` bytes, and receive
    /// them all back (any order), checking every byte. At most
    /// `RX_SLOTS` frames are on their way at once, so the loopback never
    /// has to hold (or drop) one.
    pub fn echo(&mut self, count: u32, len: &dyn Fn(u32) -> usize) -> Result<Moved, &'static str> {
        let hdr = {
            let mut h = [0u8; 16];
            self.net.fill_buffer_header(&mut h).map_err(|e| error_name(&e))?
        };
        let mut seen = vec![0u64; (count as usize).div_ceil(64)];
        let mut moved = Moved::default();
        let (mut sent, mut received) = (0u32, 0u32);
        let mut last_progress = rdtsc();
        while received < count {
            let mut progress = false;
            // Transmissions done: their buffers are free again.
            while let Some(token) = self.net.poll_transmit() {
                let i = match self.tx_by_token.get_mut(token as usize) {
                    Some(t) if *t != NONE => core::mem::replace(t, NONE) as usize,
                    _ => return Err("unknown_tx_token"),
                };
                // SAFETY: the buffer given to transmit_begin with this token.
                unsafe {
                    self.net
                        .transmit_complete(token, &self.tx[i].as_slice()[..self.tx_len[i]])
                }
                .map_err(|e| error_name(&e))?;
                self.tx_free.push(i);
                progress = true;
            }
            // Frames back: check, count, post the buffer again.
            while let Some(token) = self.net.poll_receive() {
                let i = match self.rx_by_token.get_mut(token as usize) {
                    Some(t) if *t != NONE => core::mem::replace(t, NONE) as usize,
                    _ => return Err("unknown_rx_token"),
                };
                // SAFETY: the buffer given to receive_begin with this token.
                let (h, n) = unsafe { self.net.receive_complete(token, self.rx[i].as_mut_slice()) }
                    .map_err(|e| error_name(&e))?;
                let seq = check(self.mac, &self.rx[i].as_slice()[h..h + n]).ok_or("bad_frame")?;
                if seq >= count || seen[seq as usize / 64] & (1 << (seq % 64)) != 0 {
                    return Err("unexpected_frame");
                }
                seen[seq as usize / 64] |= 1 << (seq % 64);
                received += 1;
                moved.frames += 1;
                moved.bytes += n as u64;
                self.post_rx(i).map_err(|e| error_name(&e))?;
                progress = true;
            }
            // More to send, while a buffer is free and the receive side has
            // room for everything on its way.
            while sent < count && (sent - received) < RX_SLOTS as u32 {
                let Some(i) = self.tx_free.pop() else { break };
                let n = len(sent).clamp(MIN_FRAME, MAX_FRAME);
                let buf = self.tx[i].as_mut_slice();
                buf[..hdr].fill(0);
                build(self.mac, sent, n, &mut buf[hdr..hdr + n]);
                self.tx_len[i] = hdr + n;
                // SAFETY: the buffer stays put and untouched until
                // poll_transmit returns its token.
                let token = unsafe { self.net.transmit_begin(&self.tx[i].as_slice()[..hdr + n]) }
                    .map_err(|e| error_name(&e))?;
                *self.tx_by_token.get_mut(token as usize).ok_or("bad_tx_token")? = i as u8;
                sent += 1;
                progress = true;
            }
            if progress {
                last_progress = rdtsc();
            } else if rdtsc() - last_progress > TIMEOUT {
                return Err("timeout");
            } else {
                spin_loop();
            }
        }
        Ok(moved)
    }
}

const ETHERTYPE_ARP: [u8; 2] = [0x08, 0x06];
/// ARP requests sent to a peer on a TAP (`probe.net_peer`).
const ARP_EXCHANGES: u32 = 4;

/// An ARP request (Ethernet, IPv4) from `mac`/`ip` for `peer`.
fn arp_request(mac: [u8; 6], ip: [u8; 4], peer: [u8; 4], out: &mut [u8]) -> usize {
    out[0..6].fill(0xff);
    out[6..12].copy_from_slice(&mac);
    out[12..14].copy_from_slice(&ETHERTYPE_ARP);
    // htype 1, ptype IPv4, hlen 6, plen 4, op 1 (request)
    out[14..22].copy_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    out[22..28].copy_from_slice(&mac);
    out[28..32].copy_from_slice(&ip);
    out[32..38].fill(0);
    out[38..42].copy_from_slice(&peer);
    42
}

/// The peer's MAC if `frame` is an ARP reply from `peer` to `mac`.
fn arp_reply_from(mac: [u8; 6], peer: [u8; 4], frame: &[u8]) -> Option<[u8; 6]> {
    let is_reply = frame.len() >= 42
        && frame[0..6] == mac
        && frame[12..14] == ETHERTYPE_ARP
        && frame[20..22] == [0, 2]
        && frame[28..32] == peer
        && frame[32..38] == mac;
    is_reply.then(|| frame[22..28].try_into().unwrap())
}

impl Rig {
    /// Asks `peer` (a host behind a TAP) for its MAC `ARP_EXCHANGES`
    /// times, each time waiting for the reply; other frames the host sends
    /// (IPv6 chatter) are skipped. Returns the peer's MAC.
    pub fn arp(&mut self, ip: [u8; 4], peer: [u8; 4]) -> Result<([u8; 6], Moved), &'static str> {
        let hdr = {
            let mut h = [0u8; 16];
            self.net.fill_buffer_header(&mut h).map_err(|e| error_name(&e))?
        };
        let mut moved = Moved::default();
        let mut peer_mac = None;
        for _ in 0..ARP_EXCHANGES {
            let i = self.tx_free.pop().ok_or("no_tx_buffer")?;
            let buf = self.tx[i].as_mut_slice();
            buf[..hdr].fill(0);
            let n = arp_request(self.mac, ip, peer, &mut buf[hdr..]);
            // SAFETY: the buffer stays put and untouched until
            // poll_transmit returns its token, which the loop below waits for.
            let token =
                unsafe { self.net.transmit_begin(&self.tx[i].as_slice()[..hdr + n]) }.map_err(|e| error_name(&e))?;
            let start = rdtsc();
            let (mut sent, mut answered) = (false, false);
            while !(sent && answered) {
                if rdtsc() - start > TIMEOUT {
                    return Err("arp_timeout");
                }
                if !sent && self.net.poll_transmit() == Some(token) {
                    // SAFETY: the buffer given to transmit_begin with this token.
                    unsafe { self.net.transmit_complete(token, &self.tx[i].as_slice()[..hdr + n]) }
                        .map_err(|e| error_name(&e))?;
                    self.tx_free.push(i);
                    sent = true;
                    moved.frames += 1;
                    moved.bytes += n as u64;
                }
                if let Some(rx_token) = self.net.poll_receive() {
                    let j = match self.rx_by_token.get_mut(rx_token as usize) {
                        Some(t) if *t != NONE => core::mem::replace(t, NONE) as usize,
                        _ => return Err("unknown_rx_token"),
                    };
                    // SAFETY: the buffer given to receive_begin with this token.
                    let (h, len) = unsafe { self.net.receive_complete(rx_token, self.rx[j].as_mut_slice()) }
                        .map_err(|e| error_name(&e))?;
                    if let Some(m) = arp_reply_from(self.mac, peer, &self.rx[j].as_slice()[h..h + len]) {
                        peer_mac = Some(m);
                        answered = true;
                        moved.frames += 1;
                        moved.bytes += len as u64;
                    }
                    self.post_rx(j).map_err(|e| error_name(&e))?;
                }
                spin_loop();
            }
        }
        peer_mac.map(|m| (m, moved)).ok_or("no_arp_reply")
    }
}

impl Rig {
    /// Transmits `count` broadcast ARP requests one after another, each
    /// waited for (the device completes a transmission even when its host
    /// side is gone), printing `PROBE netflood sent=<n>` every `every`
    /// frames. Receives nothing.
    pub fn flood(&mut self, count: u64, every: u64) -> Result<u64, &'static str> {
        let hdr = {
            let mut h = [0u8; 16];
            self.net.fill_buffer_header(&mut h).map_err(|e| error_name(&e))?
        };
        let i = self.tx_free.pop().ok_or("no_tx_buffer")?;
        let buf = self.tx[i].as_mut_slice();
        buf[..hdr].fill(0);
        let n = arp_request(self.mac, [10, 0, 2, 15], [10, 0, 2, 1], &mut buf[hdr..]);
        let frame = &self.tx[i].as_slice()[..hdr + n];
        for sent in 1..=count {
            // SAFETY: the buffer stays put and untouched until
            // poll_transmit returns its token, waited for just below.
            let token = unsafe { self.net.transmit_begin(frame) }.map_err(|e| error_name(&e))?;
            let start = rdtsc();
            while self.net.poll_transmit() != Some(token) {
                if rdtsc() - start > TIMEOUT {
                    return Err("tx_timeout");
                }
                spin_loop();
            }
            // SAFETY: the buffer given to transmit_begin with this token.
            unsafe { self.net.transmit_complete(token, frame) }.map_err(|e| error_name(&e))?;
            if sent % every == 0 {
                crate::serial::Line::new("netflood").dec("sent", sent).emit();
            }
        }
        self.tx_free.push(i);
        Ok(count)
    }
}

/// `a.b.c.d` as four bytes.
fn parse_ipv4(text: &[u8]) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = text.split(|&b| b == b'.');
    for o in out.iter_mut() {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 3 || !p.iter().all(u8::is_ascii_digit) {
            return None;
        }
        *o = u8::try_from(p.iter().fold(0u32, |v, &d| v * 10 + u32::from(d - b'0'))).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// Mode `basic` on a TAP (`probe.net_peer=<host IPv4>`, `probe.net_ip=<ours>`):
/// ARP the host and check it answers.
fn exchange_with_peer(dev: Device, ip: [u8; 4], peer: [u8; 4]) -> bool {
    let Device { transport, stats, name } = dev;
    let mut rig = match Rig::new(transport) {
        Ok(r) => r,
        Err(e) => return init_failed(name, &e),
    };
    if !check_features(name, &stats) {
        return false;
    }
    let result = rig.arp(ip, peer);
    drop(rig);
    let mut line = name.line().word("peer=arp");
    if let Ok((_, moved)) = &result {
        line = line.dec("frames", moved.frames).dec("bytes", moved.bytes);
    }
    line = annotate(line.dec("notifies", stats.notifies.get()), &stats);
    match result {
        Ok((mac, _)) => {
            let mut text = [b':'; 17];
            for (k, &b) in mac.iter().enumerate() {
                let mut buf = [0u8; 20];
                let hex = crate::serial::digits(u64::from(b) | 0x100, 16, &mut buf);
                // The 0x100 keeps a leading zero; drop its own digit.
                text[k * 3..k * 3 + 2].copy_from_slice(&hex[1..]);
            }
            line.text("peer_mac", &text).word("result=ok").emit();
            true
        }
        Err(r) => {
            line.word("result=fail").text("reason", r.as_bytes()).emit();
            false
        }
    }
}

/// Mode `basic`: with `probe.net_peer`, an ARP exchange with the host on
/// a TAP; otherwise 64 frames of 20 to 1514 bytes through the loopback,
/// each echoed and checked.
pub fn workload(dev: Device, settings: &super::Settings) -> bool {
    if let Some(peer) = crate::bootinfo::param(settings.cmdline, "probe.net_peer") {
        let ip = crate::bootinfo::param(settings.cmdline, "probe.net_ip").and_then(parse_ipv4);
        return match (parse_ipv4(peer), ip) {
            (Some(peer), Some(ip)) => exchange_with_peer(dev, ip, peer),
            _ => {
                dev.name
                    .line()
                    .word("result=fail reason=bad_probe.net_peer_or_net_ip")
                    .emit();
                false
            }
        };
    }
    let Device { transport, stats, name } = dev;
    let mut rig = match Rig::new(transport) {
        Ok(r) => r,
        Err(e) => return init_failed(name, &e),
    };
    if !check_features(name, &stats) {
        return false;
    }
    // Both extremes, then lengths spread over the range.
    let len = |n: u32| match n {
        0 => MIN_FRAME,
        1 => MAX_FRAME,
        _ => MIN_FRAME + (n as usize * 379) % (MAX_FRAME - MIN_FRAME + 1),
    };
    let result = rig.echo(FRAMES, &len);
    // Tear the driver down before reporting: `annotate` tells how it went.
    drop(rig);
    let mut line = name.line();
    let moved = match &result {
        Ok(m) => m,
        Err(_) => &Moved::default(),
    };
    line = line
        .dec("frames", moved.frames)
        .dec("bytes", moved.bytes)
        .dec("notifies", stats.notifies.get());
    line = annotate(line, &stats);
    match result {
        Ok(_) if moved.frames == FRAMES as u64 => {
            line.word("result=ok").emit();
            true
        }
        Ok(_) => {
            line.word("result=fail reason=lost_frames").emit();
            false
        }
        Err(r) => {
            line.word("result=fail").text("reason", r.as_bytes()).emit();
            false
        }
    }
}
