//! KVM state holders: guest memory, the VM, vCPUs and their threads.

pub mod memory;
pub mod vcpu;
pub mod vcpu_thread;
pub mod vm;
