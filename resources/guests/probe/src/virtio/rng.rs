//! virtio-rng: two 4 KiB reads; each must not be all zeros, and they must
//! differ.

use super::{annotate, check_features, error_name, init_failed, Buf, Device};
use crate::hal::ProbeHal;
use virtio_drivers::device::rng::VirtIORng;

const LEN: usize = 4096;

/// Fill `buf` with entropy, as many requests as it takes.
fn read_all(
    rng: &mut VirtIORng<ProbeHal, super::transport::Probed>,
    buf: &mut [u8],
    requests: &mut u64,
) -> Result<(), &'static str> {
    let mut at = 0;
    while at < buf.len() {
        *requests += 1;
        let n = rng.request_entropy(&mut buf[at..]).map_err(|e| error_name(&e))?;
        if n == 0 {
            return Err("empty_answer");
        }
        at += n.min(buf.len() - at);
    }
    Ok(())
}

pub fn workload(dev: Device) -> bool {
    let Device { transport, stats, name } = dev;
    let mut rng = match VirtIORng::<ProbeHal, _>::new(transport) {
        Ok(r) => r,
        Err(e) => return init_failed(name, &e),
    };
    if !check_features(name, &stats) {
        return false;
    }
    let (mut a, mut b) = (Buf::new(LEN), Buf::new(LEN));
    let mut requests = 0;
    let result = read_all(&mut rng, a.as_mut_slice(), &mut requests)
        .and_then(|_| read_all(&mut rng, b.as_mut_slice(), &mut requests))
        .and_then(|_| {
            let zero = |s: &[u8]| s.iter().all(|&x| x == 0);
            if zero(a.as_slice()) || zero(b.as_slice()) {
                Err("all_zero")
            } else if a.as_slice() == b.as_slice() {
                Err("same_twice")
            } else {
                Ok(())
            }
        });
    // Tear the driver down before reporting: `annotate` tells how it went.
    drop(rng);
    let line = name
        .line()
        .dec("bytes", 2 * LEN as u64)
        .dec("requests", requests)
        .dec("notifies", stats.notifies.get());
    let line = annotate(line, &stats);
    match result {
        Ok(()) => {
            line.word("result=ok").emit();
            true
        }
        Err(r) => {
            line.word("result=fail").text("reason", r.as_bytes()).emit();
            false
        }
    }
}
