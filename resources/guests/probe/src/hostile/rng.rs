//! virtio-rng cases (§5.4): the request queue takes device-writable
//! buffers only; broken chains and buffers the device cannot write must
//! come back empty (used length 0).

use super::io::{fill, rd8, ANSWER_TICKS};
use super::vq::{Desc, Next};
use super::{accept, Answer, Ctx, Dev};

const LEN: u32 = 64;
const REFUSED: (&str, u8) = ("len0", accept::LEN0);

fn buf(d: &Dev) -> u64 {
    d.vqs[0].buf(0)
}

fn send(d: &mut Dev, chain: &[Desc]) -> Answer {
    let Dev { t, vqs, .. } = d;
    let vq = &mut vqs[0];
    let head = vq.submit(chain);
    vq.kick(&mut **t);
    match vq.wait(head, ANSWER_TICKS) {
        None => Answer::NotDone,
        Some(0) => Answer::Len0,
        Some(n) => Answer::Len(n),
    }
}

/// The good request: 64 bytes, all filled, not all zero.
pub fn good(d: &mut Dev) -> Result<(), &'static str> {
    let b = buf(d);
    fill(b, LEN as u64, 0);
    match send(d, &[Desc::w(b, LEN)]) {
        Answer::Len(LEN) if (0..LEN as u64).any(|i| rd8(b + i) != 0) => Ok(()),
        Answer::Len(LEN) => Err("all_zero"),
        Answer::NotDone => Err("not_done"),
        _ => Err("short"),
    }
}

pub fn cases(ctx: &mut Ctx, d: &mut Dev) {
    let b = buf(d);
    let size = d.vqs[0].size;
    let (outside, end) = (ctx.outside, ctx.ram_end);
    let half = LEN / 2;

    // 1: chains that never end, or go off the table.
    let a = send(d, &[Desc::w(b, half), Desc::w(b + 32, half).next(Next::To(0))]);
    ctx.judge(d, "desc_loop", REFUSED.0, REFUSED.1, a);
    let a = send(d, &[Desc::w(b, LEN).next(Next::Raw(size))]);
    ctx.judge(d, "desc_next_out_of_table", REFUSED.0, REFUSED.1, a);

    // 3: buffers outside RAM or across its end.
    let a = send(d, &[Desc::w(outside, LEN)]);
    ctx.judge(d, "buf_outside_ram", REFUSED.0, REFUSED.1, a);
    let a = send(d, &[Desc::w(end - half as u64, LEN)]);
    ctx.judge(d, "buf_straddles_ram_end", REFUSED.0, REFUSED.1, a);

    // 4: a buffer whose end wraps around 64 bits.
    let a = send(d, &[Desc::w(u64::MAX - 0xF, LEN)]);
    ctx.judge(d, "addr_len_overflow_u64", REFUSED.0, REFUSED.1, a);

    // A device-readable buffer: nothing for the device to fill.
    let a = send(d, &[Desc::r(b, LEN)]);
    ctx.judge(d, "readable_buffer", REFUSED.0, REFUSED.1, a);
}
