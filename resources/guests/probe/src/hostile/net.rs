//! virtio-net cases (§5.1.6): broken transmit chains must not put a frame
//! on the wire, broken receive chains must come back empty, and the link
//! keeps working.
//!
//! The good request sends one frame with a fresh tag and expects that very
//! frame back in a receive buffer; veil runs these tests with
//! `--net loopback`, which returns every transmitted frame. A frame that a
//! broken chain should never have sent shows up there first, as a stray.
//!
//! Queue 0 receives, queue 1 transmits. Without MRG_RXBUF every frame is
//! preceded by the 12-byte `virtio_net_hdr` (VERSION_1).

use super::io::{fill, rd8, wr8, ANSWER_TICKS};
use super::vq::{Desc, Next};
use super::{accept, Answer, Ctx, Dev, Kind};

const RX: usize = 0;
const TX: usize = 1;
const HDR_LEN: u32 = 12;
/// Ethernet header and a minimum payload.
const FRAME_LEN: u32 = 60;
const RX_LEN: u32 = HDR_LEN + 1514;
/// Receive buffers the good request posts while it skips stray frames.
const RX_TRIES: usize = 3;

/// Transmit chains that must not be sent: given back (length 0).
const NOT_SENT: (&str, u8) = ("len0", accept::LEN0);

fn tx_buf(d: &Dev) -> u64 {
    d.vqs[TX].buf(0)
}

fn rx_buf(d: &Dev) -> u64 {
    d.vqs[RX].buf(0)
}

/// A broadcast frame with an EtherType for local experiments, carrying
/// `tag` (so that frames are told apart), after a zero virtio-net header.
fn build_frame(at: u64, tag: u32) {
    fill(at, (HDR_LEN + FRAME_LEN) as u64, 0);
    let f = at + HDR_LEN as u64;
    fill(f, 6, 0xFF);
    for (i, b) in [0x52, 0x54, 0x00, 0x6e, 0x65, 0x74].iter().enumerate() {
        wr8(f + 6 + i as u64, *b);
    }
    wr8(f + 12, 0x88);
    wr8(f + 13, 0xB5);
    for (i, b) in b"veil-hostile".iter().enumerate() {
        wr8(f + 14 + i as u64, *b);
    }
    for (i, b) in tag.to_le_bytes().iter().enumerate() {
        wr8(f + 26 + i as u64, *b);
    }
}

fn submit(d: &mut Dev, q: usize, chain: &[Desc]) -> u16 {
    let Dev { t, vqs, .. } = d;
    let head = vqs[q].submit(chain);
    vqs[q].kick(&mut **t);
    head
}

fn answer(d: &mut Dev, q: usize, head: u16) -> Answer {
    match d.vqs[q].wait(head, ANSWER_TICKS) {
        None => Answer::NotDone,
        Some(0) => Answer::Len0,
        Some(n) => Answer::Len(n),
    }
}

/// The good request: a tagged frame out, the same frame back in.
pub fn good(d: &mut Dev) -> Result<(), &'static str> {
    let tag = match &mut d.kind {
        Kind::Net { tag } => {
            *tag += 1;
            *tag
        }
        _ => 0,
    };
    let (tx, rx) = (tx_buf(d), rx_buf(d));
    build_frame(tx, tag);
    fill(rx, RX_LEN as u64, 0);
    let mut rx_head = submit(d, RX, &[Desc::w(rx, RX_LEN)]);
    let tx_head = submit(d, TX, &[Desc::r(tx, HDR_LEN + FRAME_LEN)]);
    if d.vqs[TX].wait(tx_head, ANSWER_TICKS).is_none() {
        return Err("tx_not_done");
    }
    let mut stray = false;
    for _ in 0..RX_TRIES {
        let Some(len) = d.vqs[RX].wait(rx_head, ANSWER_TICKS) else {
            return Err("rx_not_done");
        };
        let whole = HDR_LEN + FRAME_LEN;
        let same = len == whole && (HDR_LEN as u64..whole as u64).all(|i| rd8(rx + i) == rd8(tx + i));
        if same {
            return if stray { Err("stray_frame_before") } else { Ok(()) };
        }
        // Not our frame: one a bad case should not have sent.
        stray = true;
        fill(rx, RX_LEN as u64, 0);
        rx_head = submit(d, RX, &[Desc::w(rx, RX_LEN)]);
    }
    Err("frame_lost")
}

fn tx_case(ctx: &mut Ctx, d: &mut Dev, case: &str, chain: &[Desc]) {
    let tx = tx_buf(d);
    build_frame(tx, 0xBAD0_0000);
    let head = submit(d, TX, chain);
    let a = answer(d, TX, head);
    ctx.judge(d, case, NOT_SENT.0, NOT_SENT.1, a);
}

/// A receive chain the device cannot fill, posted before the good
/// request: it must come back empty, and the frame must go to the good
/// request's buffer.
fn rx_case(ctx: &mut Ctx, d: &mut Dev, case: &str, addr: u64) {
    let head = submit(d, RX, &[Desc::w(addr, RX_LEN)]);
    let next = good(d);
    let a = answer(d, RX, head);
    let mut got = a.text();
    if let Err(why) = next {
        got.push(",next=").push(why);
    }
    ctx.report(d, case, "len0", &got, a == Answer::Len0 && next.is_ok());
}

pub fn cases(ctx: &mut Ctx, d: &mut Dev) {
    let tx = tx_buf(d);
    let size = d.vqs[TX].size;
    let (outside, end) = (ctx.outside, ctx.ram_end);
    let hdr = HDR_LEN;

    // 1: chains that never end, or go off the table.
    tx_case(
        ctx,
        d,
        "tx_desc_loop",
        &[Desc::r(tx, hdr), Desc::r(tx + 12, FRAME_LEN).next(Next::To(0))],
    );
    tx_case(
        ctx,
        d,
        "tx_desc_next_out_of_table",
        &[Desc::r(tx, hdr + FRAME_LEN).next(Next::Raw(size))],
    );

    // 3: frames outside RAM or across its end.
    tx_case(
        ctx,
        d,
        "tx_buf_outside_ram",
        &[Desc::r(tx, hdr), Desc::r(outside, FRAME_LEN)],
    );
    tx_case(
        ctx,
        d,
        "tx_buf_straddles_ram_end",
        &[Desc::r(tx, hdr), Desc::r(end - 30, FRAME_LEN)],
    );

    // 4: lengths whose sums overflow 32 and 64 bits.
    tx_case(
        ctx,
        d,
        "tx_len_overflow_u32",
        &[
            Desc::r(tx, hdr),
            Desc::r(tx + 12, 0xFFFF_FFFF),
            Desc::r(tx + 12, 0xFFFF_FFFF),
        ],
    );
    tx_case(
        ctx,
        d,
        "tx_addr_len_overflow_u64",
        &[Desc::r(tx, hdr), Desc::r(u64::MAX - 0xF, 0x40)],
    );

    // 3, receive side.
    rx_case(ctx, d, "rx_buf_outside_ram", outside);
    rx_case(ctx, d, "rx_buf_straddles_ram_end", end - 16);
}
