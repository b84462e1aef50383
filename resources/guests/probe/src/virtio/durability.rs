//! Mode `durability`: numbered blocks written in batches, each batch
//! followed by a FLUSH, for the host's fault tests (tests/faults.rs).
//!
//! Settings: `probe.blocks=<n>` blocks of 4 KiB (default 64, at most the
//! disk), `probe.batch=<k>` blocks per FLUSH (default 4). Block `b` covers
//! sectors `8b..8b+8` and holds the block pattern of those sectors (blk.rs),
//! so its content names its place. Each write is one request, waited for.
//!
//! Output, per batch: `PROBE durability acked=<n>` once the batch's writes
//! completed (blocks below `n` were acknowledged, OK or not), then
//! `PROBE durability FLUSHED blocks=<n>` once the FLUSH after them
//! completed OK. A write answered with an error prints
//! `PROBE durability block=<b> write=<error>` and the run goes on; a
//! failed FLUSH `PROBE durability flush=<error> blocks=<n>`. At the end
//! `PROBE durability blocks=<n> ok=<n> write_errors=<n> flush_errors=<n>
//! result=ok|fail` (fail: any error).

use super::blk::{fill, Blk};
use super::{check_features, error_name, init_failed, Buf, Device, Settings};
use crate::serial::Line;

const BLOCK_SECTORS: u64 = 8;
const BLOCK_BYTES: usize = 4096;

pub fn run(devs: alloc::vec::Vec<Device>, settings: &Settings) -> bool {
    let Some(dev) = devs.into_iter().find(|d| d.name.kind == "blk") else {
        Line::new("durability").word("error=no_blk_device").emit();
        return false;
    };
    let Device { transport, stats, name } = dev;
    let mut blk = match Blk::new(transport) {
        Ok(b) => b,
        Err(e) => return init_failed(name, &e),
    };
    if !check_features(name, &stats) {
        return false;
    }
    let blocks = settings.num("probe.blocks", 64).min(blk.capacity() / BLOCK_SECTORS);
    let batch = settings.num("probe.batch", 4).max(1);
    let mut buf = Buf::new(BLOCK_BYTES);
    let (mut ok, mut write_errors, mut flush_errors) = (0u64, 0u64, 0u64);
    let mut b = 0u64;
    while b < blocks {
        let end = (b + batch).min(blocks);
        for block in b..end {
            let sector = block * BLOCK_SECTORS;
            fill(settings.seed, sector, buf.as_mut_slice());
            match blk.write_blocks(sector as usize, buf.as_slice()) {
                Ok(()) => ok += 1,
                Err(e) => {
                    write_errors += 1;
                    Line::new("durability")
                        .dec("block", block)
                        .text("write", error_name(&e).as_bytes())
                        .emit();
                }
            }
        }
        Line::new("durability").dec("acked", end).emit();
        match blk.flush() {
            Ok(()) => Line::new("durability").word("FLUSHED").dec("blocks", end).emit(),
            Err(e) => {
                flush_errors += 1;
                Line::new("durability")
                    .text("flush", error_name(&e).as_bytes())
                    .dec("blocks", end)
                    .emit();
            }
        }
        b = end;
    }
    let good = write_errors == 0 && flush_errors == 0;
    name.tag(Line::new("durability"))
        .dec("blocks", blocks)
        .dec("ok", ok)
        .dec("write_errors", write_errors)
        .dec("flush_errors", flush_errors)
        .word(if good { "result=ok" } else { "result=fail" })
        .emit();
    good
}
