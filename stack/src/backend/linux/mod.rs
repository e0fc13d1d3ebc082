//! Linux userspace in a Xen DomU (in progress).
