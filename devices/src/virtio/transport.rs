//! The virtio state machine that both transports drive: feature
//! negotiation, queue configuration, status and reset (virtio 1.2 §2–§3).

use super::{features, status, Activation, ActiveQueue, DeviceMetrics, InterruptCause, VirtioDevice, VirtioInterrupt};
use crate::dma::{DmaMemory, DmaMode, SharedPages};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

/// What the driver wrote for one queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueConfig {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ..Default::default()
        }
    }
}

/// Which half of a 64-bit queue address a register holds.
#[derive(Clone, Copy, Debug)]
pub enum Half {
    Low,
    High,
}

fn set_half(value: &mut u64, half: Half, word: u32) {
    *value = match half {
        Half::Low => (*value & !0xffff_ffff) | u64::from(word),
        Half::High => (*value & 0xffff_ffff) | (u64::from(word) << 32),
    };
}

/// Which queue address a register holds.
#[derive(Clone, Copy, Debug)]
pub enum QueueAddress {
    Desc,
    Avail,
    Used,
}

/// The ways a device can see guest memory; the transport picks one when
/// the driver starts the device.
#[derive(Clone)]
pub struct DmaViews {
    /// Addresses are guest-physical (no ACCESS_PLATFORM, or no vIOMMU).
    pub direct: DmaMemory,
    /// Addresses are IOVAs of the device's vIOMMU endpoint, if it has one.
    pub translated: Option<DmaMemory>,
    /// The VM's shared-page gate, which `auto` devices follow.
    pub shared: Option<Arc<SharedPages>>,
}

impl From<DmaMemory> for DmaViews {
    fn from(direct: DmaMemory) -> DmaViews {
        DmaViews {
            direct,
            translated: None,
            shared: None,
        }
    }
}

/// What the secure transition needs to reach in a running device: set at
/// activation, read by the callback `SharedPages` runs at ESM.
struct SecureWatch {
    name: String,
    /// Running with guest-physical addresses in `auto` mode: such a device
    /// must be reset to renegotiate ACCESS_PLATFORM.
    auto_bypass: AtomicBool,
    /// How the running device sees memory, for the ESM log line.
    view: std::sync::Mutex<&'static str>,
    needs_reset: AtomicBool,
    interrupt: Arc<dyn VirtioInterrupt>,
    metrics: Arc<DeviceMetrics>,
}

impl SecureWatch {
    fn guest_went_secure(&self) {
        let view = *self.view.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !self.auto_bypass.swap(false, Ordering::AcqRel) {
            log::info!("{}: guest is secure: {view} DMA, shared pages only", self.name);
            return;
        }
        log::info!(
            "{}: guest is secure: auto DMA leaves bypass; DEVICE_NEEDS_RESET so the driver renegotiates ACCESS_PLATFORM",
            self.name
        );
        self.needs_reset.store(true, Ordering::Release);
        DeviceMetrics::inc(&self.metrics.needs_reset);
        if self.interrupt.trigger(InterruptCause::Config).is_ok() {
            DeviceMetrics::inc(&self.metrics.interrupts);
        }
    }
}

pub struct VirtioState {
    device: Box<dyn VirtioDevice>,
    dma_mode: DmaMode,
    /// In platform mode, refuse drivers that do not accept ACCESS_PLATFORM.
    insist_platform: bool,
    views: DmaViews,
    watch: Arc<SecureWatch>,
    interrupt: Arc<dyn VirtioInterrupt>,
    metrics: Arc<DeviceMetrics>,
    status: u8,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u16,
    queues: Vec<QueueConfig>,
    notify: Vec<EventFd>,
    config_generation: u32,
}

impl VirtioState {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        dma_mode: DmaMode,
        insist_platform: bool,
        views: impl Into<DmaViews>,
        interrupt: Arc<dyn VirtioInterrupt>,
        metrics: Arc<DeviceMetrics>,
    ) -> std::io::Result<Self> {
        let views = views.into();
        let watch = Arc::new(SecureWatch {
            name: device.name().to_string(),
            auto_bypass: AtomicBool::new(false),
            view: std::sync::Mutex::new("no"),
            needs_reset: AtomicBool::new(false),
            interrupt: interrupt.clone(),
            metrics: metrics.clone(),
        });
        if let Some(shared) = &views.shared {
            let w = Arc::downgrade(&watch);
            shared.on_secure(Box::new(move || {
                if let Some(w) = w.upgrade() {
                    w.guest_went_secure();
                }
            }));
        }
        let queues: Vec<QueueConfig> = device.queue_max_sizes().iter().map(|&m| QueueConfig::new(m)).collect();
        let notify = queues
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<std::io::Result<_>>()?;
        Ok(Self {
            device,
            dma_mode,
            insist_platform,
            views,
            watch,
            interrupt,
            metrics,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            notify,
            config_generation: 0,
        })
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    pub fn metrics(&self) -> &Arc<DeviceMetrics> {
        &self.metrics
    }

    pub fn dma_mode(&self) -> DmaMode {
        self.dma_mode
    }

    /// The eventfd of each queue, for the VMM to register as ioeventfds.
    pub fn notify_events(&self) -> &[EventFd] {
        &self.notify
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Features offered: the device's own, with ACCESS_PLATFORM as the DMA
    /// mode says.
    pub fn offered_features(&self) -> u64 {
        let own = self.device.device_features() | features::VERSION_1;
        if self.offers_platform() {
            own | features::ACCESS_PLATFORM
        } else {
            own & !features::ACCESS_PLATFORM
        }
    }

    /// `auto` is bypass until the guest goes secure, platform after.
    fn offers_platform(&self) -> bool {
        match self.dma_mode {
            DmaMode::Bypass => false,
            DmaMode::Platform => true,
            DmaMode::Auto => self.views.shared.as_ref().is_some_and(|s| s.is_secure()),
        }
    }

    pub fn status(&self) -> u8 {
        if self.device.needs_reset() || self.watch.needs_reset.load(Ordering::Acquire) {
            self.status | status::DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    pub fn config_generation(&self) -> u32 {
        self.config_generation
    }

    fn bad_write(&self, what: &str) {
        DeviceMetrics::inc(&self.metrics.bad_register_writes);
        log::debug!("{}: ignored {what}", self.device.name());
    }

    pub fn select_device_features(&mut self, sel: u32) {
        self.device_features_sel = sel;
    }

    pub fn device_features_word(&self) -> u32 {
        match self.device_features_sel {
            0 => self.offered_features() as u32,
            1 => (self.offered_features() >> 32) as u32,
            _ => 0,
        }
    }

    pub fn select_driver_features(&mut self, sel: u32) {
        self.driver_features_sel = sel;
    }

    pub fn driver_features_word(&self) -> u32 {
        match self.driver_features_sel {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        }
    }

    pub fn write_driver_features(&mut self, word: u32) {
        if self.status & status::FEATURES_OK != 0 {
            return self.bad_write("driver features after FEATURES_OK");
        }
        match self.driver_features_sel {
            0 => set_half(&mut self.driver_features, Half::Low, word),
            1 => set_half(&mut self.driver_features, Half::High, word),
            _ if word != 0 => self.bad_write("driver features beyond bit 63"),
            _ => {}
        }
    }

    pub fn select_queue(&mut self, sel: u32) {
        // An out-of-range selection is allowed; it reads as a queue of size 0.
        self.queue_sel = u16::try_from(sel).unwrap_or(u16::MAX);
    }

    pub fn selected_queue(&self) -> u16 {
        self.queue_sel
    }

    pub fn queue(&self) -> Option<&QueueConfig> {
        self.queues.get(usize::from(self.queue_sel))
    }

    fn queue_for_write(&mut self, what: &str) -> Option<&mut QueueConfig> {
        if self.status & status::DRIVER_OK != 0 {
            self.bad_write(&format!("{what} after DRIVER_OK"));
            return None;
        }
        let sel = usize::from(self.queue_sel);
        if sel >= self.queues.len() {
            self.bad_write(&format!("{what} for missing queue {sel}"));
            return None;
        }
        self.queues.get_mut(sel)
    }

    pub fn set_queue_size(&mut self, size: u32) {
        let metrics = self.metrics.clone();
        let name = self.device.name().to_string();
        if let Some(q) = self.queue_for_write("queue size") {
            match u16::try_from(size) {
                Ok(s) if s.is_power_of_two() && s <= q.max_size => q.size = s,
                _ => {
                    DeviceMetrics::inc(&metrics.bad_queue_sizes);
                    log::warn!(
                        "{name}: refused queue size {size} (max {}, must be a power of two)",
                        q.max_size
                    );
                }
            }
        }
    }

    pub fn set_queue_ready(&mut self, ready: bool) {
        // A driver stops using a queue by writing 0 and reading it back
        // (virtio 1.2 §4.2.2.2), also after DRIVER_OK: let that through, so
        // the read-back sees 0; the device itself stops at the next reset.
        if !ready && self.status & status::DRIVER_OK != 0 {
            if let Some(q) = self.queues.get_mut(usize::from(self.queue_sel)) {
                q.ready = false;
            }
            return;
        }
        let Some(q) = self.queue_for_write("queue ready") else {
            return;
        };
        q.ready = ready;
        let cfg = *q;
        // A secure guest's rings must be on pages it shared: refuse them
        // here, once, rather than failing every request later.
        if ready && self.is_secure() {
            let index = usize::from(self.queue_sel);
            if let Err(why) = self.build_queue(index, &cfg) {
                self.queues[index].ready = false;
                self.refuse_rings(&why);
            }
        }
    }

    fn is_secure(&self) -> bool {
        self.views.shared.as_ref().is_some_and(|s| s.is_secure())
    }

    /// Rings the device cannot reach: on private pages (secure guest) or
    /// outside memory.
    fn refuse_rings(&mut self, why: &str) {
        if self.is_secure() {
            DeviceMetrics::inc(&self.metrics.private_rings);
        } else {
            DeviceMetrics::inc(&self.metrics.bad_descriptors);
        }
        self.needs_reset(why);
    }

    pub fn set_queue_address(&mut self, which: QueueAddress, half: Half, word: u32) {
        if let Some(q) = self.queue_for_write("queue address") {
            let field = match which {
                QueueAddress::Desc => &mut q.desc,
                QueueAddress::Avail => &mut q.avail,
                QueueAddress::Used => &mut q.used,
            };
            set_half(field, half, word);
        }
    }

    /// A notification that did not go through an ioeventfd.
    pub fn notify(&mut self, queue: u32) {
        match usize::try_from(queue).ok().and_then(|q| self.notify.get(q)) {
            Some(evt) => {
                let _ = evt.write(1);
            }
            None => {
                DeviceMetrics::inc(&self.metrics.bad_notifications);
                log::debug!("{}: notification for missing queue {queue}", self.device.name());
            }
        }
    }

    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.device.read_config(offset, data);
    }

    pub fn write_config(&mut self, offset: u64, data: &[u8]) {
        if self.device.write_config(offset, data) {
            self.config_generation = self.config_generation.wrapping_add(1);
        } else {
            self.bad_write("config-space write");
        }
    }

    /// The driver writes the status register.
    pub fn set_status(&mut self, value: u8) {
        if value == 0 {
            return self.reset();
        }
        let old = self.status;
        if value & old != old {
            // Clearing a bit other than by reset is not allowed.
            return self.bad_write(&format!("status {value:#x} over {old:#x}"));
        }
        let added = value & !old;
        let mut new = value & !status::DEVICE_NEEDS_RESET | (old & status::DEVICE_NEEDS_RESET);
        if added & status::FEATURES_OK != 0 {
            if let Err(why) = self.check_features() {
                DeviceMetrics::inc(&self.metrics.features_refused);
                log::warn!(
                    "{}: refused features {:#x}: {why}",
                    self.device.name(),
                    self.driver_features
                );
                new &= !status::FEATURES_OK;
            }
        }
        if added & status::DRIVER_OK != 0 {
            if new & status::FEATURES_OK == 0 {
                self.bad_write("DRIVER_OK without FEATURES_OK");
                new &= !status::DRIVER_OK;
            } else if self.status() & status::DEVICE_NEEDS_RESET != 0 {
                // Broken until reset (e.g. a ring refused at queue enable).
                log::debug!("{}: DRIVER_OK while it needs a reset: not started", self.device.name());
            } else {
                self.status = new;
                return self.activate();
            }
        }
        self.status = new;
    }

    fn check_features(&self) -> Result<(), String> {
        let acked = self.driver_features;
        let offered = self.offered_features();
        if acked & !offered != 0 {
            return Err(format!(
                "driver accepted features never offered: {:#x}",
                acked & !offered
            ));
        }
        if acked & features::VERSION_1 == 0 {
            return Err("legacy drivers are not supported (VERSION_1 not accepted)".into());
        }
        if self.offers_platform() && self.insist_platform && acked & features::ACCESS_PLATFORM == 0 {
            return Err("this device insists on ACCESS_PLATFORM".into());
        }
        self.device.accept_features(acked)
    }

    fn build_queue(&self, index: usize, cfg: &QueueConfig) -> Result<Queue, String> {
        let mut q = Queue::new(cfg.max_size).map_err(|e| format!("queue {index}: {e:?}"))?;
        q.try_set_size(cfg.size)
            .map_err(|e| format!("queue {index} size: {e:?}"))?;
        q.try_set_desc_table_address(GuestAddress(cfg.desc))
            .map_err(|e| format!("queue {index} descriptor table: {e:?}"))?;
        q.try_set_avail_ring_address(GuestAddress(cfg.avail))
            .map_err(|e| format!("queue {index} available ring: {e:?}"))?;
        q.try_set_used_ring_address(GuestAddress(cfg.used))
            .map_err(|e| format!("queue {index} used ring: {e:?}"))?;
        q.set_event_idx(self.driver_features & features::RING_EVENT_IDX != 0);
        q.set_ready(true);
        if !q.is_valid(self.active_view()) {
            let secure = if self.is_secure() {
                " (secure guest: shared pages only)"
            } else {
                ""
            };
            return Err(format!(
                "queue {index}: rings at {:#x}/{:#x}/{:#x} are not in memory the device may reach{secure}",
                cfg.desc, cfg.avail, cfg.used
            ));
        }
        Ok(q)
    }

    fn activate(&mut self) {
        let mut queues = Vec::new();
        for (index, cfg) in self.queues.iter().enumerate().filter(|(_, c)| c.ready) {
            let built = self.build_queue(index, cfg).and_then(|queue| {
                let notify = self.notify[index].try_clone().map_err(|e| e.to_string())?;
                Ok(ActiveQueue {
                    index: index as u16,
                    queue,
                    notify,
                })
            });
            match built {
                Ok(q) => queues.push(q),
                Err(why) => return self.refuse_rings(&why),
            }
        }
        let platform = self.driver_features & features::ACCESS_PLATFORM != 0;
        let secure = self.is_secure();
        if secure && self.dma_mode == DmaMode::Auto && !platform {
            // Negotiated while the guest was ordinary, started after ESM.
            return self.needs_reset("auto DMA: features negotiated before ESM, without ACCESS_PLATFORM");
        }
        let view = match (platform, &self.views.translated) {
            (true, Some(_)) => "translated",
            (true, None) => "platform (identity)",
            (false, _) => "bypass",
        };
        let activation = Activation {
            mem: self.active_view().clone(),
            queues,
            interrupt: self.interrupt.clone(),
            acked_features: self.driver_features,
            metrics: self.metrics.clone(),
        };
        match self.device.activate(activation) {
            Ok(()) => {
                DeviceMetrics::inc(&self.metrics.activations);
                if platform {
                    DeviceMetrics::inc(&self.metrics.activations_platform);
                }
                if secure {
                    DeviceMetrics::inc(&self.metrics.activations_secure);
                }
                *self
                    .watch
                    .view
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = view;
                self.watch
                    .auto_bypass
                    .store(self.dma_mode == DmaMode::Auto && !platform, Ordering::Release);
                log::info!(
                    "{}: activated, {:?} mode: {view} DMA{}",
                    self.device.name(),
                    self.dma_mode,
                    if secure { ", shared pages only" } else { "" }
                );
            }
            Err(e) => self.needs_reset(&e.to_string()),
        }
    }

    /// The view the driver's negotiation chose: IOVAs when it accepted
    /// ACCESS_PLATFORM and the device has a vIOMMU endpoint, guest-physical
    /// addresses otherwise.
    fn active_view(&self) -> &DmaMemory {
        match &self.views.translated {
            Some(t) if self.driver_features & features::ACCESS_PLATFORM != 0 => t,
            _ => &self.views.direct,
        }
    }

    /// Tells the driver the device is broken until it resets it: sets
    /// DEVICE_NEEDS_RESET and raises a configuration interrupt.
    pub fn needs_reset(&mut self, why: &str) {
        log::warn!("{}: needs reset: {why}", self.device.name());
        DeviceMetrics::inc(&self.metrics.needs_reset);
        self.status |= status::DEVICE_NEEDS_RESET;
        if self.interrupt.trigger(InterruptCause::Config).is_ok() {
            DeviceMetrics::inc(&self.metrics.interrupts);
        }
    }

    pub fn reset(&mut self) {
        self.device.reset();
        self.watch.needs_reset.store(false, Ordering::Release);
        self.watch.auto_bypass.store(false, Ordering::Release);
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
        for evt in &self.notify {
            let _ = evt.read();
        }
        DeviceMetrics::inc(&self.metrics.resets);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::direct_view;
    use crate::virtio::ActivateError;
    use std::sync::atomic::Ordering;
    use std::sync::Mutex;
    use vm_memory::GuestMemoryMmap;

    struct Dummy {
        activations: Arc<Mutex<Vec<usize>>>,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn name(&self) -> &str {
            "dummy0"
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn device_features(&self) -> u64 {
            features::VERSION_1 | 1
        }
        fn read_config(&self, _offset: u64, data: &mut [u8]) {
            data.fill(7);
        }
        fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
            self.activations.lock().unwrap().push(a.queues.len());
            Ok(())
        }
        fn reset(&mut self) {}
    }

    #[derive(Default)]
    struct Irq(Mutex<Vec<InterruptCause>>);
    impl VirtioInterrupt for Irq {
        fn trigger(&self, cause: InterruptCause) -> std::io::Result<()> {
            self.0.lock().unwrap().push(cause);
            Ok(())
        }
    }

    fn state(mode: DmaMode, insist: bool) -> (VirtioState, Arc<Mutex<Vec<usize>>>, Arc<Irq>) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let acts = Arc::new(Mutex::new(Vec::new()));
        let irq = Arc::new(Irq::default());
        let dev = Box::new(Dummy {
            activations: acts.clone(),
        });
        let s = VirtioState::new(dev, mode, insist, direct_view(mem), irq.clone(), Arc::default()).unwrap();
        (s, acts, irq)
    }

    fn negotiate(s: &mut VirtioState, features: u64) {
        s.set_status(status::ACKNOWLEDGE);
        s.set_status(status::ACKNOWLEDGE | status::DRIVER);
        s.select_driver_features(0);
        s.write_driver_features(features as u32);
        s.select_driver_features(1);
        s.write_driver_features((features >> 32) as u32);
        s.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    }

    fn setup_queue(s: &mut VirtioState, q: u32, base: u64) {
        s.select_queue(q);
        s.set_queue_size(16);
        s.set_queue_address(QueueAddress::Desc, Half::Low, base as u32);
        s.set_queue_address(QueueAddress::Avail, Half::Low, (base + 0x100) as u32);
        s.set_queue_address(QueueAddress::Used, Half::Low, (base + 0x200) as u32);
        s.set_queue_ready(true);
    }

    const OK: u8 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    #[test]
    fn happy_path_activates_with_ready_queues() {
        let (mut s, acts, _) = state(DmaMode::Bypass, false);
        negotiate(&mut s, features::VERSION_1 | 1);
        assert_ne!(s.status() & status::FEATURES_OK, 0);
        setup_queue(&mut s, 0, 0x1000);
        s.set_status(OK);
        assert_eq!(s.status(), OK);
        assert_eq!(*acts.lock().unwrap(), vec![1]);
    }

    #[test]
    fn bypass_never_offers_access_platform_and_platform_does() {
        let (s, _, _) = state(DmaMode::Bypass, false);
        assert_eq!(s.offered_features() & features::ACCESS_PLATFORM, 0);
        let (p, _, _) = state(DmaMode::Platform, false);
        assert_ne!(p.offered_features() & features::ACCESS_PLATFORM, 0);
    }

    #[test]
    fn features_ok_is_refused_for_bad_feature_sets() {
        for (mode, insist, feats) in [
            (DmaMode::Bypass, false, 1u64),                                            // no VERSION_1
            (DmaMode::Bypass, false, features::VERSION_1 | features::ACCESS_PLATFORM), // not offered
            (DmaMode::Platform, true, features::VERSION_1),                            // insisting device
        ] {
            let (mut s, _, _) = state(mode, insist);
            negotiate(&mut s, feats);
            assert_eq!(s.status() & status::FEATURES_OK, 0, "{mode:?} {feats:#x}");
            assert_eq!(s.metrics().features_refused.load(Ordering::Relaxed), 1);
            s.set_status(OK);
            assert_eq!(s.status() & status::DRIVER_OK, 0);
        }
        let (mut s, _, _) = state(DmaMode::Platform, false);
        negotiate(&mut s, features::VERSION_1);
        assert_ne!(s.status() & status::FEATURES_OK, 0, "a non-insisting device accepts");
    }

    #[test]
    fn bad_queue_sizes_and_notifications_are_counted() {
        let (mut s, _, _) = state(DmaMode::Bypass, false);
        s.select_queue(0);
        for bad in [0, 3, 32, 0x1_0000] {
            s.set_queue_size(bad);
        }
        assert_eq!(s.queue().unwrap().size, 16);
        assert_eq!(s.metrics().bad_queue_sizes.load(Ordering::Relaxed), 4);
        s.notify(2);
        s.notify(u32::MAX);
        assert_eq!(s.metrics().bad_notifications.load(Ordering::Relaxed), 2);
        s.notify(1);
        assert_eq!(s.notify_events()[1].read().unwrap(), 1);
    }

    #[test]
    fn rings_outside_memory_set_needs_reset_and_interrupt() {
        let (mut s, acts, irq) = state(DmaMode::Bypass, false);
        negotiate(&mut s, features::VERSION_1);
        setup_queue(&mut s, 0, 0xffff_f000);
        s.set_status(OK);
        assert_ne!(s.status() & status::DEVICE_NEEDS_RESET, 0);
        assert!(acts.lock().unwrap().is_empty());
        assert_eq!(*irq.0.lock().unwrap(), vec![InterruptCause::Config]);
        // Reset brings it back.
        s.set_status(0);
        assert_eq!(s.status(), 0);
        negotiate(&mut s, features::VERSION_1);
        setup_queue(&mut s, 0, 0x1000);
        s.set_status(OK);
        assert_eq!(s.status(), OK);
    }

    #[test]
    fn a_queue_can_be_stopped_after_driver_ok_but_not_restarted() {
        let (mut s, _, _) = state(DmaMode::Bypass, false);
        negotiate(&mut s, features::VERSION_1);
        setup_queue(&mut s, 0, 0x1000);
        s.set_status(OK);
        s.select_queue(0);
        s.set_queue_ready(false);
        assert!(!s.queue().unwrap().ready);
        s.set_queue_ready(true);
        assert!(!s.queue().unwrap().ready);
    }

    #[test]
    fn queue_config_is_frozen_after_driver_ok() {
        let (mut s, _, _) = state(DmaMode::Bypass, false);
        negotiate(&mut s, features::VERSION_1);
        setup_queue(&mut s, 0, 0x1000);
        s.set_status(OK);
        s.select_queue(0);
        s.set_queue_address(QueueAddress::Desc, Half::Low, 0x5000);
        s.select_driver_features(0);
        s.write_driver_features(0);
        assert_eq!(s.queue().unwrap().desc, 0x1000);
        assert_eq!(s.driver_features_word(), 0);
        assert!(s.metrics().bad_register_writes.load(Ordering::Relaxed) >= 2);
    }

    /// A host view that accepts every protection change.
    struct NoHost;
    impl crate::dma::HostProtection for NoHost {
        fn set_accessible(&self, _gpa: u64, _len: u64, _accessible: bool) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A device behind the shared-page gate of a 1 MiB guest, as the VMM
    /// builds it; also returns the gate and the identity translation.
    fn gated(
        mode: DmaMode,
        device: Box<dyn VirtioDevice>,
    ) -> (VirtioState, Arc<SharedPages>, Arc<crate::dma::DmaTranslation>, Arc<Irq>) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let shared = Arc::new(SharedPages::new(&[(0, 1 << 20)]));
        let identity = Arc::new(crate::dma::DmaTranslation::identity(&shared, "test"));
        let views = DmaViews {
            direct: crate::dma::translated_view(mem, identity.clone()),
            translated: None,
            shared: Some(shared.clone()),
        };
        let irq = Arc::new(Irq::default());
        let s = VirtioState::new(device, mode, false, views, irq.clone(), Arc::default()).unwrap();
        (s, shared, identity, irq)
    }

    fn dummy() -> (Box<dyn VirtioDevice>, Arc<Mutex<Vec<usize>>>) {
        let acts = Arc::new(Mutex::new(Vec::new()));
        (
            Box::new(Dummy {
                activations: acts.clone(),
            }),
            acts,
        )
    }

    fn count(s: &VirtioState, name: &str) -> u64 {
        s.metrics().snapshot().into_iter().find(|(n, _)| *n == name).unwrap().1
    }

    #[test]
    fn reset_returns_only_once_the_worker_let_go_of_guest_memory() {
        let rng = Box::new(crate::virtio::rng::Rng::new("rng0").unwrap());
        let (mut s, _, identity, _) = gated(DmaMode::Bypass, rng);
        let idle = Arc::strong_count(&identity);
        negotiate(&mut s, features::VERSION_1);
        setup_queue(&mut s, 0, 0x1000);
        s.set_status(OK);
        assert_eq!(s.status(), OK);
        assert!(Arc::strong_count(&identity) > idle, "the worker holds a view");
        s.set_status(0);
        // No waiting: when the write returns the worker has stopped and
        // dropped its view of the rings and buffers.
        assert_eq!(Arc::strong_count(&identity), idle);
        assert_eq!(s.status(), 0);
    }

    #[test]
    fn auto_device_in_reset_at_esm_offers_access_platform_next() {
        let (dev, acts) = dummy();
        let (mut s, shared, _, irq) = gated(DmaMode::Auto, dev);
        negotiate(&mut s, features::VERSION_1);
        setup_queue(&mut s, 0, 0x1000);
        s.set_status(OK);
        s.set_status(0);
        assert_eq!(s.offered_features() & features::ACCESS_PLATFORM, 0);
        shared.enter_secure(0x1000, 1, &NoHost).unwrap();
        assert_eq!(s.status(), 0, "a device in reset needs no other reset");
        assert!(irq.0.lock().unwrap().is_empty());
        assert_ne!(s.offered_features() & features::ACCESS_PLATFORM, 0);
        negotiate(&mut s, features::VERSION_1 | features::ACCESS_PLATFORM);
        setup_queue(&mut s, 0, 0x1000);
        s.set_status(OK);
        assert_eq!(s.status(), OK);
        assert_eq!(acts.lock().unwrap().len(), 2);
        let counts: Vec<_> = ["activations", "activations_platform", "activations_secure"]
            .iter()
            .map(|n| count(&s, n))
            .collect();
        assert_eq!(counts, vec![2, 1, 1], "bypass before ESM, platform after");
    }

    #[test]
    fn auto_device_running_at_esm_needs_reset() {
        let (dev, _) = dummy();
        let (mut s, shared, _, irq) = gated(DmaMode::Auto, dev);
        negotiate(&mut s, features::VERSION_1);
        setup_queue(&mut s, 0, 0x1000);
        s.set_status(OK);
        shared.enter_secure(0x1000, 1, &NoHost).unwrap();
        assert_eq!(s.status(), OK | status::DEVICE_NEEDS_RESET);
        assert_eq!(*irq.0.lock().unwrap(), vec![InterruptCause::Config]);
        s.set_status(0);
        assert_eq!(s.status(), 0);
    }

    #[test]
    fn auto_features_negotiated_before_esm_cannot_start_after_it() {
        let (dev, acts) = dummy();
        let (mut s, shared, _, _) = gated(DmaMode::Auto, dev);
        negotiate(&mut s, features::VERSION_1);
        setup_queue(&mut s, 0, 0x1000);
        shared.enter_secure(0x1000, 1, &NoHost).unwrap();
        s.set_status(OK);
        assert_ne!(s.status() & status::DEVICE_NEEDS_RESET, 0);
        assert!(acts.lock().unwrap().is_empty());
    }

    #[test]
    fn secure_rings_on_private_pages_are_refused_at_queue_enable() {
        let (dev, acts) = dummy();
        let (mut s, shared, _, irq) = gated(DmaMode::Platform, dev);
        shared.enter_secure(0x1000, 1, &NoHost).unwrap();
        negotiate(&mut s, features::VERSION_1 | features::ACCESS_PLATFORM);
        setup_queue(&mut s, 0, 0x1000);
        assert!(s.queue().unwrap().ready, "rings on the shared page");
        assert_eq!(s.status() & status::DEVICE_NEEDS_RESET, 0);
        setup_queue(&mut s, 1, 0x8000);
        assert!(!s.queue().unwrap().ready, "rings on private pages");
        assert_ne!(s.status() & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(*irq.0.lock().unwrap(), vec![InterruptCause::Config]);
        s.set_status(OK);
        assert!(acts.lock().unwrap().is_empty(), "DRIVER_OK does not start it");
        assert_eq!(count(&s, "private_rings"), 1, "counted once");
        assert_eq!(count(&s, "bad_descriptors"), 0);
        // After a reset, rings it shared start.
        s.set_status(0);
        shared.share(0x8000, 1, &NoHost).unwrap();
        negotiate(&mut s, features::VERSION_1 | features::ACCESS_PLATFORM);
        setup_queue(&mut s, 0, 0x1000);
        setup_queue(&mut s, 1, 0x8000);
        s.set_status(OK);
        assert_eq!(s.status(), OK);
        assert_eq!(*acts.lock().unwrap(), vec![2]);
    }

    #[test]
    fn secure_rings_made_private_before_driver_ok_are_refused_there() {
        let (dev, acts) = dummy();
        let (mut s, shared, _, _) = gated(DmaMode::Platform, dev);
        shared.enter_secure(0x1000, 1, &NoHost).unwrap();
        negotiate(&mut s, features::VERSION_1 | features::ACCESS_PLATFORM);
        setup_queue(&mut s, 0, 0x1000);
        shared.unshare(0x1000, 1, &NoHost).unwrap();
        s.set_status(OK);
        assert_ne!(s.status() & status::DEVICE_NEEDS_RESET, 0);
        assert!(acts.lock().unwrap().is_empty());
        assert_eq!(count(&s, "private_rings"), 1);
    }
}
