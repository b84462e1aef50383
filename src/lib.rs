//! veil: a minimal virtual machine monitor on Linux KVM.
//!
//! The data path reads in one direction: a vCPU exit (`vmm::vcpu`) goes to
//! a bus (`veil_devices::Bus`), then to a device, which reaches guest
//! memory through its DMA view.

pub mod bench;

pub mod cli;
pub mod config;
pub mod devices_config;
pub mod error;
pub mod probe_image;
pub mod sandbox;
pub mod vmm;
