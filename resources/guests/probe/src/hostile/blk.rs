//! virtio-blk cases (§5.2.6): broken chains, indirect tables, buffers
//! outside RAM, lengths that overflow, sectors past the end, writes to a
//! read-only disk.
//!
//! A request is a 16-byte header (type, reserved, sector), data, and one
//! status byte the device writes. The probe sets the status byte to 0xFF
//! before each request, so "returned without an answer" (used length 0,
//! status untouched) is told apart from IOERR/UNSUPP/OK. Buffers lie in
//! queue 0's area (offsets below are from its buffer part).

use super::io::{fill, rd8, wr32, wr64, wr8, Text, ANSWER_TICKS};
use super::vq::{put_desc, Desc, Next, F_INDIRECT, F_NEXT, F_WRITE};
use super::{accept, Answer, Ctx, Dev, Kind, F_INDIRECT_DESC, S_OK};

/// The read-only feature (§5.2.3).
pub const F_RO: u64 = 1 << 5;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

const SECTOR: u32 = 512;

const HDR: u64 = 0x0000;
const STATUS: u64 = 0x0100;
/// A discard / write-zeroes segment (16 bytes).
const SEGMENT: u64 = 0x0200;
const DATA: u64 = 0x1000; // 0x8000 bytes
const IND_A: u64 = 0x9000; // 0x2000 bytes
const IND_B: u64 = 0xB000; // 0x2000 bytes
const SAVED: u64 = 0xD000; // one sector

/// Answers for malformed chains: IOERR if the device could answer, or the
/// chain back with length 0.
const REFUSED: (&str, u8) = ("ioerr|len0", accept::LEN0 | accept::IOERR);
/// Requests that are well formed but invalid for the disk: IOERR.
const IOERR: (&str, u8) = ("ioerr", accept::IOERR);

struct Bufs {
    hdr: u64,
    status: u64,
    segment: u64,
    data: u64,
    ind_a: u64,
    ind_b: u64,
    saved: u64,
}

fn bufs(d: &Dev) -> Bufs {
    let v = &d.vqs[0];
    Bufs {
        hdr: v.buf(HDR),
        status: v.buf(STATUS),
        segment: v.buf(SEGMENT),
        data: v.buf(DATA),
        ind_a: v.buf(IND_A),
        ind_b: v.buf(IND_B),
        saved: v.buf(SAVED),
    }
}

fn capacity(d: &Dev) -> (u64, bool) {
    match d.kind {
        Kind::Blk { capacity, ro } => (capacity, ro),
        _ => (0, false),
    }
}

/// Header and an unanswered status byte.
fn header(d: &Dev, kind: u32, sector: u64) {
    let b = bufs(d);
    wr32(b.hdr, kind);
    wr32(b.hdr + 4, 0);
    wr64(b.hdr + 8, sector);
    wr8(b.status, 0xFF);
}

/// Submits `chain` on queue 0 and waits for its answer.
fn send(d: &mut Dev, chain: &[Desc]) -> Answer {
    let status = bufs(d).status;
    let Dev { t, vqs, .. } = d;
    let vq = &mut vqs[0];
    let head = vq.submit(chain);
    vq.kick(&mut **t);
    match vq.wait(head, ANSWER_TICKS) {
        None => Answer::NotDone,
        Some(len) => match rd8(status) {
            0xFF if len == 0 => Answer::Len0,
            s => Answer::Status(s, len),
        },
    }
}

/// Reads `sector` into the data buffer (pre-filled with 0xEE).
fn read(d: &mut Dev, sector: u64, len: u32) -> Answer {
    let b = bufs(d);
    header(d, T_IN, sector);
    fill(b.data, len as u64, 0xEE);
    send(d, &[Desc::r(b.hdr, 16), Desc::w(b.data, len), Desc::w(b.status, 1)])
}

/// Writes the data buffer to `sector`.
fn write(d: &mut Dev, sector: u64, len: u32) -> Answer {
    let b = bufs(d);
    header(d, T_OUT, sector);
    send(d, &[Desc::r(b.hdr, 16), Desc::r(b.data, len), Desc::w(b.status, 1)])
}

/// The good request: read one sector; OK with used length 513.
pub fn good(d: &mut Dev) -> Result<(), &'static str> {
    let (capacity, _) = capacity(d);
    match read(d, capacity.min(2) / 2, SECTOR) {
        Answer::Status(S_OK, 513) => Ok(()),
        Answer::Status(S_OK, _) => Err("good_read_len"),
        Answer::NotDone => Err("good_read_not_done"),
        _ => Err("good_read_failed"),
    }
}

fn same(a: u64, b: u64, len: u64) -> bool {
    (0..len).all(|i| rd8(a + i) == rd8(b + i))
}

fn copy(to: u64, from: u64, len: u64) {
    for i in 0..len {
        wr8(to + i, rd8(from + i));
    }
}

pub fn cases(ctx: &mut Ctx, d: &mut Dev) {
    let b = bufs(d);
    let (capacity, ro) = capacity(d);
    let size = d.vqs[0].size;
    let (outside, end) = (ctx.outside, ctx.ram_end);

    // A writable disk really stores what it is given: the good requests
    // that follow every case are reads of real data.
    if !ro && capacity >= 4 {
        for i in 0..SECTOR as u64 {
            wr8(b.data + i, (i as u8) ^ 0xA5);
        }
        copy(b.saved, b.data, SECTOR as u64);
        let w = write(d, 3, SECTOR);
        let r = read(d, 3, SECTOR);
        let matched = same(b.saved, b.data, SECTOR as u64);
        let mut got = w.text();
        got.push(",").push_bytes(r.text().as_bytes());
        got.push(if matched { ",match" } else { ",mismatch" });
        let ok = matches!(w, Answer::Status(S_OK, 1)) && matches!(r, Answer::Status(S_OK, 513)) && matched;
        ctx.report(d, "write_read_back", "ok,ok,match", &got, ok);
    }

    // 1: chains that never end, or go off the table.
    header(d, T_IN, 0);
    let a = send(d, &[Desc::r(b.hdr, 16), Desc::w(b.data, SECTOR).next(Next::To(0))]);
    ctx.judge(d, "desc_loop", REFUSED.0, REFUSED.1, a);

    header(d, T_IN, 0);
    let a = send(d, &[Desc::r(b.hdr, 16).next(Next::To(0))]);
    ctx.judge(d, "desc_self_loop", REFUSED.0, REFUSED.1, a);

    header(d, T_IN, 0);
    let a = send(d, &[Desc::r(b.hdr, 16), Desc::w(b.data, SECTOR).next(Next::Raw(size))]);
    ctx.judge(d, "desc_next_out_of_table", REFUSED.0, REFUSED.1, a);

    // 2: indirect tables that nest, or have the wrong length.
    if d.features & F_INDIRECT_DESC == 0 {
        for case in [
            "indirect_nested",
            "indirect_len_not_x16",
            "indirect_too_many",
            "indirect_len_huge",
        ] {
            ctx.skip(d, case, "indirect_not_offered");
        }
    } else {
        // Table A: header, then an indirect descriptor to table B (data,
        // status): a complete request, if nesting were allowed.
        header(d, T_IN, 0);
        put_desc(b.ind_a, b.hdr, 16, F_NEXT, 1);
        put_desc(b.ind_a + 16, b.ind_b, 32, F_INDIRECT, 0);
        put_desc(b.ind_b, b.data, SECTOR, F_WRITE | F_NEXT, 1);
        put_desc(b.ind_b + 16, b.status, 1, F_WRITE, 0);
        let a = send(d, &[Desc::indirect(b.ind_a, 32)]);
        ctx.judge(d, "indirect_nested", REFUSED.0, REFUSED.1, a);

        // A valid three-entry table, announced with wrong lengths: 40
        // bytes (not a multiple of 16), queue size + 1 entries, ~4 GiB.
        let valid_table = |d: &Dev| {
            header(d, T_IN, 0);
            fill(b.ind_a, 0x2000, 0);
            put_desc(b.ind_a, b.hdr, 16, F_NEXT, 1);
            put_desc(b.ind_a + 16, b.data, SECTOR, F_WRITE | F_NEXT, 2);
            put_desc(b.ind_a + 32, b.status, 1, F_WRITE, 0);
        };
        valid_table(d);
        let a = send(d, &[Desc::indirect(b.ind_a, 40)]);
        ctx.judge(d, "indirect_len_not_x16", REFUSED.0, REFUSED.1, a);

        valid_table(d);
        let a = send(d, &[Desc::indirect(b.ind_a, (size as u32 + 1) * 16)]);
        ctx.judge(d, "indirect_too_many", REFUSED.0, REFUSED.1, a);

        valid_table(d);
        let a = send(d, &[Desc::indirect(b.ind_a, 0xFFFF_FFF0)]);
        ctx.judge(d, "indirect_len_huge", REFUSED.0, REFUSED.1, a);
    }

    // 3: buffers outside RAM, across its end; header, status and an
    // indirect table outside RAM.
    header(d, T_IN, 0);
    let a = send(d, &[Desc::r(b.hdr, 16), Desc::w(outside, SECTOR), Desc::w(b.status, 1)]);
    ctx.judge(d, "buf_outside_ram", REFUSED.0, REFUSED.1, a);

    header(d, T_IN, 0);
    let a = send(
        d,
        &[Desc::r(b.hdr, 16), Desc::w(end - 256, SECTOR), Desc::w(b.status, 1)],
    );
    ctx.judge(d, "buf_straddles_ram_end", REFUSED.0, REFUSED.1, a);

    header(d, T_IN, 0);
    let a = send(
        d,
        &[Desc::r(outside, 16), Desc::w(b.data, SECTOR), Desc::w(b.status, 1)],
    );
    ctx.judge(d, "header_outside_ram", REFUSED.0, REFUSED.1, a);

    header(d, T_IN, 0);
    let a = send(d, &[Desc::r(b.hdr, 16), Desc::w(b.data, SECTOR), Desc::w(outside, 1)]);
    ctx.judge(d, "status_outside_ram", REFUSED.0, REFUSED.1, a);

    if d.features & F_INDIRECT_DESC != 0 {
        header(d, T_IN, 0);
        let a = send(d, &[Desc::indirect(outside, 48)]);
        ctx.judge(d, "indirect_outside_ram", REFUSED.0, REFUSED.1, a);
    }

    // 4: lengths whose sums overflow 32 and 64 bits.
    header(d, T_IN, 0);
    let a = send(
        d,
        &[
            Desc::r(b.hdr, 16),
            Desc::w(b.data, 0xFFFF_FFFF),
            Desc::w(b.data, 0xFFFF_FFFF),
            Desc::w(b.status, 1),
        ],
    );
    ctx.judge(d, "len_overflow_u32", REFUSED.0, REFUSED.1, a);

    header(d, T_IN, 0);
    let a = send(
        d,
        &[
            Desc::r(b.hdr, 16),
            Desc::w(u64::MAX - 0x1FF, 0x400),
            Desc::w(b.status, 1),
        ],
    );
    ctx.judge(d, "addr_len_overflow_u64", REFUSED.0, REFUSED.1, a);

    header(d, T_IN, 0);
    let a = send(
        d,
        &[
            Desc::r(b.hdr, 16),
            Desc::w(b.data, SECTOR),
            Desc::w(u64::MAX - 7, 0x100),
        ],
    );
    ctx.judge(d, "status_addr_wraps", REFUSED.0, REFUSED.1, a);

    // 5: sectors past the end of the disk.
    let a = read(d, capacity, SECTOR);
    ctx.judge(d, "read_past_end", IOERR.0, IOERR.1, a);

    let a = read(d, capacity.saturating_sub(1), 2 * SECTOR);
    ctx.judge(d, "read_straddles_end", IOERR.0, IOERR.1, a);

    let a = read(d, u64::MAX / 512, SECTOR);
    ctx.judge(d, "read_sector_max", IOERR.0, IOERR.1, a);

    let a = read(d, u64::MAX, SECTOR);
    ctx.judge(d, "read_sector_u64_max", IOERR.0, IOERR.1, a);

    if !ro {
        fill(b.data, SECTOR as u64, 0x3C);
        let a = write(d, capacity, SECTOR);
        ctx.judge(d, "write_past_end", IOERR.0, IOERR.1, a);
    }

    // 6: writes to a read-only disk fail and change nothing.
    if ro {
        readonly(ctx, d, "write_readonly", T_OUT);
        readonly(ctx, d, "write_zeroes_readonly", T_WRITE_ZEROES);
        readonly(ctx, d, "discard_readonly", T_DISCARD);
    }
}

/// A request that would change sector 0 of a read-only disk: IOERR (or
/// UNSUPP for the kinds whose feature was not offered), and sector 0 reads
/// the same before and after.
fn readonly(ctx: &mut Ctx, d: &mut Dev, case: &str, kind: u32) {
    let b = bufs(d);
    let before = read(d, 0, SECTOR);
    copy(b.saved, b.data, SECTOR as u64);
    let a = if kind == T_OUT {
        fill(b.data, SECTOR as u64, 0x5A);
        write(d, 0, SECTOR)
    } else {
        // One segment: sector 0, 1 sector, no flags.
        wr64(b.segment, 0);
        wr32(b.segment + 8, 1);
        wr32(b.segment + 12, 0);
        header(d, kind, 0);
        send(d, &[Desc::r(b.hdr, 16), Desc::r(b.segment, 16), Desc::w(b.status, 1)])
    };
    let after = read(d, 0, SECTOR);
    let unchanged = matches!(before, Answer::Status(S_OK, _))
        && matches!(after, Answer::Status(S_OK, _))
        && same(b.saved, b.data, SECTOR as u64);
    let (expect, set) = if kind == T_OUT {
        ("ioerr,unchanged", accept::IOERR)
    } else {
        ("ioerr|unsupp,unchanged", accept::IOERR | accept::UNSUPP)
    };
    let next = good(d);
    let mut got: Text = a.text();
    got.push(if unchanged { ",unchanged" } else { ",changed" });
    if let Err(why) = next {
        got.push(",next=").push(why);
    }
    let ok = a.is(set) && unchanged && next.is_ok();
    ctx.report(d, case, expect, &got, ok);
}
