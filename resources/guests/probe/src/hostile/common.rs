//! What every device goes through: bring-up (§3.1.1), and the cases that
//! concern the transport rather than the requests: a feature never
//! offered (§3.1.1 step 5-6), a queue size that is not a power of two
//! (§2.7), a queue that does not exist, a notification nobody owns, and
//! rings outside RAM (§2.1.2: DEVICE_NEEDS_RESET).

use super::io::Text;
use super::transport::{self, ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK, INT_CONFIG};
use super::vq::MAX_SIZE;
use super::{blk, net, rng, Ctx, Dev, Kind, F_VERSION_1};

/// Correct requests after bring-up: enough to use ring slots 0..4, so that
/// a device that took the refused queue size of 3 would read the wrong
/// slot for the fourth.
const FIRST_REQUESTS: usize = 5;

/// A queue index no device here has.
const MISSING_QUEUE: u16 = 7;

/// Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK.
pub fn negotiate(d: &mut Dev) -> Result<(), &'static str> {
    if !transport::reset(d.t) {
        return Err("reset_not_done");
    }
    d.t.set_status(ACKNOWLEDGE);
    d.t.set_status(ACKNOWLEDGE | DRIVER);
    d.offered = d.t.device_features();
    d.features = d.offered & d.want;
    if d.features & F_VERSION_1 == 0 {
        return Err("no_version_1");
    }
    d.t.set_driver_features(d.features);
    d.t.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
    if d.t.status() & FEATURES_OK == 0 {
        return Err("features_refused");
    }
    Ok(())
}

/// The size the probe uses for queue `q`: the device's maximum, at most
/// `MAX_SIZE` (a power of two, as the maximum should be).
fn queue_size(d: &mut Dev, q: u16) -> Result<u16, &'static str> {
    d.t.select_queue(q);
    let max = d.t.queue_max();
    if max == 0 {
        return Err("queue_missing");
    }
    let size = max.min(MAX_SIZE);
    // The largest power of two not above it.
    Ok(1 << (15 - size.leading_zeros()))
}

/// Fresh rings for every queue, programmed into the device.
fn setup_queues(d: &mut Dev) -> Result<(), &'static str> {
    for i in 0..d.nq {
        let size = queue_size(d, i as u16)?;
        d.vqs[i].clear(size);
        d.vqs[i].program(d.t);
    }
    Ok(())
}

fn start(d: &mut Dev) -> Result<(), &'static str> {
    d.t.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    let s = d.t.status();
    if s & (DEVICE_NEEDS_RESET | FAILED) != 0 || s & DRIVER_OK == 0 {
        return Err("driver_ok_refused");
    }
    Ok(())
}

pub fn bring_up(d: &mut Dev) -> Result<(), &'static str> {
    negotiate(d)?;
    setup_queues(d)?;
    start(d)
}

/// Device-specific facts, read once features are settled.
fn learn(d: &mut Dev) {
    if let Kind::Blk { capacity, ro } = &mut d.kind {
        *capacity = d.t.config32(0) as u64 | (d.t.config32(4) as u64) << 32;
        *ro = d.offered & blk::F_RO != 0;
    }
}

/// Every case for one device.
pub fn run(ctx: &mut Ctx, d: &mut Dev) {
    // 10: a feature never offered; then a bring-up with 7 and 9 inside.
    let (mut got_features, features_ok) = features_unoffered(d);
    let first = first_bring_up(d);
    if let Err(why) = first.works {
        got_features.push(",next=").push(why);
    }
    ctx.report(
        d,
        "features_unoffered",
        "features_ok_clear",
        &got_features,
        features_ok && first.works.is_ok(),
    );
    // 7: QueueNum / queue_size = 3.
    let (got, ok) = first.queue_size;
    ctx.report(d, "queue_size_not_pow2", first.size_expect, &got, ok);
    // 9: a queue that does not exist, selected, sized and enabled.
    let (got, ok) = first.missing_queue;
    ctx.report(d, "select_missing_queue", "max=0,ready=0", &got, ok);
    if first.works.is_err() {
        // Try once more the plain way before giving up on the device.
        if let Err(why) = bring_up(d).and_then(|()| d.good()) {
            ctx.report(d, "bring_up", "ok", &Text::from(why), false);
            transport::reset(d.t);
            return;
        }
    }

    // Requests: 1-6, as they apply.
    match d.kind {
        Kind::Blk { .. } => blk::cases(ctx, d),
        Kind::Net { .. } => net::cases(ctx, d),
        Kind::Rng => rng::cases(ctx, d),
    }

    // 9: a notification no queue owns.
    bogus_notify(ctx, d);

    // 8: rings outside RAM, then reset and start again.
    let (outside, end) = (ctx.outside, ctx.ram_end);
    ring_case(ctx, d, "desc_ring_outside_ram", Ring::Desc, outside);
    ring_case(ctx, d, "used_ring_outside_ram", Ring::Used, outside);
    // The available ring's last bytes past the end of RAM.
    ring_case(ctx, d, "avail_ring_straddles_ram_end", Ring::Avail, end - 0x100);

    // Leave the device quiet.
    transport::reset(d.t);
}

/// Case 10: FEATURES_OK with a feature the device never offered must not
/// stick (§3.1.1: the device refuses by leaving FEATURES_OK clear).
fn features_unoffered(d: &mut Dev) -> (Text, bool) {
    if !transport::reset(d.t) {
        return (Text::from("reset_not_done"), false);
    }
    d.t.set_status(ACKNOWLEDGE);
    d.t.set_status(ACKNOWLEDGE | DRIVER);
    let offered = d.t.device_features();
    // Bit 50 (reserved for future extensions today), or the first free
    // bit above it should the device offer it.
    let bogus = (50..64).map(|b| 1u64 << b).find(|b| offered & b == 0).unwrap_or(0);
    d.t.set_driver_features((offered & F_VERSION_1) | bogus);
    d.t.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
    let s = d.t.status();
    let stuck = s & FEATURES_OK != 0;
    let mut got = Text::from(if stuck { "features_ok_set" } else { "features_ok_clear" });
    if s & FAILED != 0 {
        got.push(",failed");
    }
    (got, !stuck && bogus != 0)
}

type Outcome = (Text, bool);

/// What the first bring-up found.
struct First {
    /// Case 7: what the size should read as, and what it did.
    size_expect: Text,
    queue_size: Outcome,
    /// Case 9, the queue-select half.
    missing_queue: Outcome,
    /// Bring-up and the first requests.
    works: Result<(), &'static str>,
}

/// Bring-up with two cases inside: queue 0's size is written correctly,
/// then as 3 (case 7); a queue that does not exist is selected, sized and
/// enabled (case 9). Then DRIVER_OK and `FIRST_REQUESTS` good requests.
fn first_bring_up(d: &mut Dev) -> First {
    let mut first = First {
        size_expect: Text::new(),
        queue_size: (Text::new(), false),
        missing_queue: (Text::new(), false),
        works: Ok(()),
    };
    first.works = first_steps(d, &mut first);
    if let Err(why) = first.works {
        for (got, ok) in [&mut first.queue_size, &mut first.missing_queue] {
            if !got.as_bytes().is_empty() {
                got.push(",");
            }
            got.push("next=").push(why);
            *ok = false;
        }
    }
    first
}

fn first_steps(d: &mut Dev, first: &mut First) -> Result<(), &'static str> {
    negotiate(d)?;
    learn(d);

    // Case 9, the queue-select half: the missing queue reads size 0 and
    // does not become ready.
    let total = transport::count_queues(d.t);
    let missing = total.max(MISSING_QUEUE);
    d.t.select_queue(missing);
    let max = d.t.queue_max();
    d.t.set_queue_size(16);
    d.t.enable_queue();
    let ready = d.t.queue_enabled();
    let (got, ok) = &mut first.missing_queue;
    got.push("max=").dec(max as u64).push(",ready=").dec(ready as u64);
    *ok = max == 0 && !ready;

    // Case 7: size S, then 3. On PCI queue_size reads back; virtio-mmio's
    // QueueNum is write-only, so there S is left as the last good write and
    // the requests below show that the device still uses S: with 3, the
    // fourth request's ring slot would be read from the wrong place.
    let size = queue_size(d, 0)?;
    d.vqs[0].clear(size);
    d.t.set_queue_size(size);
    d.t.set_queue_size(3);
    let readback = d.t.read_queue_size();
    let (got, ok) = &mut first.queue_size;
    match readback {
        Some(n) => {
            first.size_expect.push("size=").dec(size as u64);
            got.push("size=").dec(n as u64);
            *ok = n == size;
            // Configure properly before going on.
            d.t.set_queue_size(size);
        }
        None => {
            first.size_expect.push("ring=").dec(size as u64);
            *ok = true;
        }
    }
    let (desc, avail, used) = (d.vqs[0].desc_addr(), d.vqs[0].avail_addr(), d.vqs[0].used_addr());
    d.t.set_queue_rings(desc, avail, used);
    d.t.enable_queue();
    for i in 1..d.nq {
        let size = queue_size(d, i as u16)?;
        d.vqs[i].clear(size);
        d.vqs[i].program(d.t);
    }
    start(d)?;
    for _ in 0..FIRST_REQUESTS {
        d.good()?;
    }
    if readback.is_none() {
        first.queue_size.0.push("ring=").dec(size as u64);
    }
    Ok(())
}

/// Case 9, the notification half: ignored, device unharmed.
fn bogus_notify(ctx: &mut Ctx, d: &mut Dev) {
    let total = transport::count_queues(d.t);
    let what = d.t.bogus_notify(total);
    let s = d.t.status();
    let next = d.good();
    let mut got = Text::new();
    if s & (DEVICE_NEEDS_RESET | FAILED) != 0 {
        got.push("status=").hex(s as u64);
    } else {
        got.push("ignored");
    }
    if let Err(why) = next {
        got.push(",next=").push(why);
    }
    let ok = s & (DEVICE_NEEDS_RESET | FAILED) == 0 && next.is_ok();
    ctx.report(d, what, "ignored", &got, ok);
}

#[derive(Clone, Copy)]
enum Ring {
    Desc,
    Avail,
    Used,
}

/// Case 8: queue 0 with one ring at `addr`, then DRIVER_OK: the device must
/// set DEVICE_NEEDS_RESET and raise a configuration interrupt; after a
/// reset it must come up again and work.
fn ring_case(ctx: &mut Ctx, d: &mut Dev, case: &str, ring: Ring, addr: u64) {
    let expect = "needs_reset,config_irq";
    d.t.take_interrupts();
    if let Err(why) = negotiate(d) {
        return ctx.report(d, case, expect, &Text::from(why), false);
    }
    for i in 0..d.nq {
        let size = match queue_size(d, i as u16) {
            Ok(s) => s,
            Err(why) => return ctx.report(d, case, expect, &Text::from(why), false),
        };
        d.vqs[i].clear(size);
        let v = &d.vqs[i];
        let (mut desc, mut avail, mut used) = (v.desc_addr(), v.avail_addr(), v.used_addr());
        if i == 0 {
            match ring {
                Ring::Desc => desc = addr,
                Ring::Avail => avail = addr,
                Ring::Used => used = addr,
            }
        }
        v.program_at(d.t, desc, avail, used);
    }
    d.t.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    let s = d.t.status();
    let irq = d.t.take_interrupts();
    let mut got = Text::new();
    if s & DEVICE_NEEDS_RESET != 0 {
        got.push("needs_reset");
    } else {
        got.push("status=").hex(s as u64);
    }
    got.push(if irq & INT_CONFIG != 0 {
        ",config_irq"
    } else {
        ",no_config_irq"
    });
    let bad_ok = s & DEVICE_NEEDS_RESET != 0 && irq & INT_CONFIG != 0;

    // Reset (status 0 must read back), then a proper start and a request.
    let next = bring_up(d).and_then(|()| d.good());
    if let Err(why) = next {
        got.push(",next=").push(why);
    }
    ctx.report(d, case, expect, &got, bad_ok && next.is_ok());
}
