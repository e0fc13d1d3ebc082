//! A small reader and writer for flattened device trees (devicetree specification v0.4 §5).
//!
//! Why our own instead of the `fdt` crate: this crate ships in Android (host, system and vendor
//! variants), and AOSP has no `fdt` crate to depend on (its `liblibfdt` wraps the C library and
//! is device-only, for the pVM firmware). The `fdt` crate also trusts its input and panics on
//! many malformed blobs, so we validated every blob before handing it over anyway; reading the
//! validated token stream ourselves is barely more code. The bare-metal images under tests/ still
//! use the `fdt` crate; they are never part of the Android build.
//!
//! The reader validates the whole structure block with checked arithmetic first and never
//! panics, whatever the blob holds (fuzzed by `fuzz/fuzz_targets/device_tree.rs` through
//! [`crate::facts::read_device_tree`]). The writer builds the small trees the tests and the
//! simulated platform profiles need.

use alloc::vec::Vec;

/// The blob is not a flattened device tree this reader accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadDeviceTree;

pub(crate) const FDT_MAGIC: u32 = 0xd00d_feed;
pub(crate) const FDT_BEGIN_NODE: u32 = 1;
const FDT_END_NODE: u32 = 2;
pub(crate) const FDT_PROP: u32 = 3;
pub(crate) const FDT_NOP: u32 = 4;
const FDT_END: u32 = 9;
pub(crate) const HEADER_LEN: usize = 40;
/// `size_dt_struct` exists from version 17 on; 17 is also the last one defined.
const FDT_VERSION: u32 = 17;
/// `last_comp_version` the writer states (version 17 is compatible with 16).
const FDT_LAST_COMP_VERSION: u32 = 16;
/// Deeper trees are refused (real ones are a handful of levels deep).
const MAX_DEPTH: usize = 32;
/// Length of the writer's empty memory-reservation map (one zero entry).
pub(crate) const RSVMAP_LEN: usize = 16;
const BAD: BadDeviceTree = BadDeviceTree;

/// Identifies a node of a [`DeviceTree`] (an index into its node list, root first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeId(usize);

#[derive(Clone, Copy, Debug)]
struct Node<'a> {
    name: &'a str,
    parent: Option<usize>,
}

#[derive(Clone, Copy, Debug)]
struct Prop<'a> {
    node: usize,
    name: &'a str,
    value: &'a [u8],
}

/// A validated device tree: its nodes in document order and their properties, borrowed from
/// the blob.
#[derive(Clone, Debug)]
pub struct DeviceTree<'a> {
    nodes: Vec<Node<'a>>,
    props: Vec<Prop<'a>>,
}

impl<'a> DeviceTree<'a> {
    /// Parses `data`: header, then the whole structure block (one root node named "", balanced
    /// nodes no deeper than 32, properties before subnodes, every name and value inside its
    /// block, names valid UTF-8, FDT_END last; NOP tokens are skipped).
    pub fn parse(data: &'a [u8]) -> Result<Self, BadDeviceTree> {
        if data.len() < HEADER_LEN || header_word(data, 0) != FDT_MAGIC {
            return Err(BAD);
        }
        let total = usize::try_from(header_word(data, 1)).map_err(|_| BAD)?;
        if total < HEADER_LEN || total > data.len() {
            return Err(BAD);
        }
        if header_word(data, 5) < FDT_VERSION || header_word(data, 6) > FDT_VERSION {
            return Err(BAD);
        }
        let structs = block(data, header_word(data, 2), header_word(data, 9), total).ok_or(BAD)?;
        let strings = block(data, header_word(data, 3), header_word(data, 8), total).ok_or(BAD)?;
        let mut tree = DeviceTree { nodes: Vec::new(), props: Vec::new() };
        tree.walk(structs, strings)?;
        Ok(tree)
    }

    fn walk(&mut self, structs: &'a [u8], strings: &'a [u8]) -> Result<(), BadDeviceTree> {
        let mut pos = 0usize;
        // The chain of open nodes, innermost last.
        let mut open: Vec<usize> = Vec::new();
        let mut root_done = false;
        // Properties are allowed right after a node begins, until its first subnode.
        let mut props_allowed = false;
        loop {
            let token = read_u32(structs, pos).ok_or(BAD)?;
            let body = pos.checked_add(4).ok_or(BAD)?;
            pos = match token {
                FDT_NOP => body,
                FDT_BEGIN_NODE => {
                    if root_done || open.len() == MAX_DEPTH {
                        return Err(BAD);
                    }
                    let name = c_str(structs.get(body..).ok_or(BAD)?).ok_or(BAD)?;
                    if open.is_empty() && !name.is_empty() {
                        return Err(BAD);
                    }
                    self.nodes.push(Node { name, parent: open.last().copied() });
                    open.push(self.nodes.len() - 1);
                    props_allowed = true;
                    align4(body + name.len() + 1).ok_or(BAD)?
                }
                FDT_PROP => {
                    let node = match open.last() {
                        Some(&node) if props_allowed => node,
                        _ => return Err(BAD),
                    };
                    let len = usize::try_from(read_u32(structs, body).ok_or(BAD)?).map_err(|_| BAD)?;
                    let name_at = usize::try_from(read_u32(structs, body + 4).ok_or(BAD)?).map_err(|_| BAD)?;
                    let value_at = body + 8;
                    let value_end = value_at.checked_add(len).ok_or(BAD)?;
                    let value = structs.get(value_at..value_end).ok_or(BAD)?;
                    let name = c_str(strings.get(name_at..).ok_or(BAD)?).ok_or(BAD)?;
                    self.props.push(Prop { node, name, value });
                    align4(value_end).ok_or(BAD)?
                }
                FDT_END_NODE => {
                    open.pop().ok_or(BAD)?;
                    root_done = open.is_empty();
                    props_allowed = false;
                    body
                }
                FDT_END if root_done => return Ok(()),
                _ => return Err(BAD),
            };
            // Padding may not run past the block's end.
            if pos > structs.len() {
                return Err(BAD);
            }
        }
    }

    /// The root node.
    pub fn root(&self) -> NodeId {
        NodeId(0)
    }

    /// Every node, root first, in document order.
    pub fn nodes(&self) -> impl Iterator<Item = NodeId> + '_ {
        (0..self.nodes.len()).map(NodeId)
    }

    /// The direct children of `parent`.
    pub fn children(&self, parent: NodeId) -> impl Iterator<Item = NodeId> + '_ {
        self.nodes().filter(move |n| self.nodes.get(n.0).and_then(|node| node.parent) == Some(parent.0))
    }

    /// The first child of `parent` whose full name (unit address included) is `name`.
    pub fn child(&self, parent: NodeId, name: &str) -> Option<NodeId> {
        self.children(parent).find(|&n| self.name(n) == name)
    }

    /// The node at an absolute path such as `/chosen` or `/soc/trusty-vm`.
    pub fn find(&self, path: &str) -> Option<NodeId> {
        let rest = path.strip_prefix('/')?;
        rest.split('/').filter(|c| !c.is_empty()).try_fold(self.root(), |node, name| self.child(node, name))
    }

    /// A node's full name (`""` for the root).
    pub fn name(&self, node: NodeId) -> &'a str {
        self.nodes.get(node.0).map_or("", |n| n.name)
    }

    /// The raw value of `node`'s property `name`.
    // Out of line: bring-up reads many properties, one shared copy of the search serves them.
    #[inline(never)]
    pub fn property(&self, node: NodeId, name: &str) -> Option<&'a [u8]> {
        self.props.iter().find(|p| p.node == node.0 && p.name == name).map(|p| p.value)
    }

    /// A property holding exactly one big-endian u32.
    pub fn property_u32(&self, node: NodeId, name: &str) -> Option<u32> {
        Some(u32::from_be_bytes(self.property(node, name)?.try_into().ok()?))
    }

    /// A property holding one big-endian u32 or u64 (both are used for addresses).
    pub fn property_u64(&self, node: NodeId, name: &str) -> Option<u64> {
        let value = self.property(node, name)?;
        match value.len() {
            4 => Some(u64::from(u32::from_be_bytes(value.try_into().ok()?))),
            8 => Some(u64::from_be_bytes(value.try_into().ok()?)),
            _ => None,
        }
    }

    /// A property holding one NUL-terminated UTF-8 string (without the NUL).
    pub fn property_str(&self, node: NodeId, name: &str) -> Option<&'a str> {
        let value = self.property(node, name)?;
        let text = value.strip_suffix(&[0])?;
        if text.contains(&0) {
            return None;
        }
        core::str::from_utf8(text).ok()
    }

    /// The strings of a string-list property (e.g. `compatible`); non-UTF-8 entries are skipped.
    pub fn strings(&self, node: NodeId, name: &str) -> impl Iterator<Item = &'a str> + 'a {
        let value = self.property(node, name).unwrap_or(&[]);
        let value = value.strip_suffix(&[0]).unwrap_or(value);
        let empty = value.is_empty();
        value.split(|&b| b == 0).filter(move |_| !empty).filter_map(|s| core::str::from_utf8(s).ok())
    }

    /// `node`'s `compatible` list names `compatible`.
    pub fn is_compatible(&self, node: NodeId, compatible: &str) -> bool {
        self.strings(node, "compatible").any(|c| c == compatible)
    }
}

/// Header field `index` (u32 words).
pub(crate) fn header_word(data: &[u8], index: usize) -> u32 {
    read_u32(data, index * 4).unwrap_or(0)
}

pub(crate) fn read_u32(data: &[u8], at: usize) -> Option<u32> {
    let bytes = data.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes(bytes.try_into().ok()?))
}

pub(crate) fn align4(n: usize) -> Option<usize> {
    Some(n.checked_add(3)? & !3)
}

/// A range of `data` given as (offset, size) header words, if it lies inside `total`.
fn block(data: &[u8], offset: u32, size: u32, total: usize) -> Option<&[u8]> {
    let start = usize::try_from(offset).ok()?;
    let end = start.checked_add(usize::try_from(size).ok()?)?;
    if end > total {
        return None;
    }
    data.get(start..end)
}

/// The NUL-terminated UTF-8 string at the start of `bytes` (without the NUL).
pub(crate) fn c_str(bytes: &[u8]) -> Option<&str> {
    let end = bytes.iter().position(|&b| b == 0)?;
    core::str::from_utf8(bytes.get(..end)?).ok()
}

/// Builds a flattened device tree: nodes opened and closed in order, properties written right
/// after their node opens. Names are not length-checked (Linux, Xen and libfdt accept property
/// names over the specification's 31 characters, and [`crate::facts`] uses one).
#[derive(Debug, Default)]
pub struct Writer {
    structs: Vec<u8>,
    strings: Vec<u8>,
    depth: usize,
}

impl Writer {
    /// An empty tree; the first node opened must be the root, named `""`.
    pub fn new() -> Self {
        Self::default()
    }

    fn word(&mut self, value: u32) {
        self.structs.extend_from_slice(&value.to_be_bytes());
    }

    fn pad(&mut self) {
        while self.structs.len() % 4 != 0 {
            self.structs.push(0);
        }
    }

    /// Opens a node named `name` inside the current one.
    pub fn begin_node(&mut self, name: &str) {
        self.word(FDT_BEGIN_NODE);
        self.structs.extend_from_slice(name.as_bytes());
        self.structs.push(0);
        self.pad();
        self.depth += 1;
    }

    /// Closes the innermost open node (nothing when none is open).
    pub fn end_node(&mut self) {
        if self.depth > 0 {
            self.word(FDT_END_NODE);
            self.depth -= 1;
        }
    }

    /// Adds the property `name` with the raw `value` to the innermost open node.
    pub fn property(&mut self, name: &str, value: &[u8]) {
        let name_at = self.string_offset(name);
        self.word(FDT_PROP);
        self.word(u32::try_from(value.len()).unwrap_or(u32::MAX));
        self.word(name_at);
        self.structs.extend_from_slice(value);
        self.pad();
    }

    /// An empty (boolean) property.
    pub fn property_null(&mut self, name: &str) {
        self.property(name, &[]);
    }

    /// One big-endian u32.
    pub fn property_u32(&mut self, name: &str, value: u32) {
        self.property(name, &value.to_be_bytes());
    }

    /// One big-endian u64.
    pub fn property_u64(&mut self, name: &str, value: u64) {
        self.property(name, &value.to_be_bytes());
    }

    /// Big-endian u32 cells.
    pub fn property_u32s(&mut self, name: &str, values: &[u32]) {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_be_bytes()).collect();
        self.property(name, &bytes);
    }

    /// Big-endian u64 values.
    pub fn property_u64s(&mut self, name: &str, values: &[u64]) {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_be_bytes()).collect();
        self.property(name, &bytes);
    }

    /// One NUL-terminated string.
    pub fn property_str(&mut self, name: &str, value: &str) {
        self.property_strs(name, &[value]);
    }

    /// A string list (each string NUL-terminated).
    pub fn property_strs(&mut self, name: &str, values: &[&str]) {
        let mut bytes = Vec::new();
        for value in values {
            bytes.extend_from_slice(value.as_bytes());
            bytes.push(0);
        }
        self.property(name, &bytes);
    }

    /// Offset of `name` in the strings block, appending it the first time.
    fn string_offset(&mut self, name: &str) -> u32 {
        let mut at = 0usize;
        for existing in self.strings.split(|&b| b == 0) {
            if existing == name.as_bytes() && at < self.strings.len() {
                return u32::try_from(at).unwrap_or(u32::MAX);
            }
            at += existing.len() + 1;
        }
        let at = self.strings.len();
        self.strings.extend_from_slice(name.as_bytes());
        self.strings.push(0);
        u32::try_from(at).unwrap_or(u32::MAX)
    }

    /// Closes every open node and returns the blob: header, an empty reservation map, the
    /// structure block and the strings block.
    pub fn finish(mut self) -> Vec<u8> {
        while self.depth > 0 {
            self.end_node();
        }
        self.word(FDT_END);
        let word = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let struct_at = HEADER_LEN + RSVMAP_LEN;
        let strings_at = struct_at + self.structs.len();
        let total = strings_at + self.strings.len();
        let header = [
            FDT_MAGIC,
            word(total),
            word(struct_at),
            word(strings_at),
            word(HEADER_LEN),
            FDT_VERSION,
            FDT_LAST_COMP_VERSION,
            0,
            word(self.strings.len()),
            word(self.structs.len()),
        ];
        let mut blob = Vec::with_capacity(total);
        for value in header {
            blob.extend_from_slice(&value.to_be_bytes());
        }
        blob.extend_from_slice(&[0; RSVMAP_LEN]);
        blob.extend_from_slice(&self.structs);
        blob.extend_from_slice(&self.strings);
        blob
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = Writer::new();
        w.begin_node("");
        w.property_u32("#address-cells", 2);
        w.property_strs("compatible", &["a,b", "c,d"]);
        w.begin_node("chosen");
        w.property_str("bootargs", "console=hvc0");
        w.end_node();
        w.begin_node("soc");
        w.begin_node("dev@1000");
        w.property_u64s("reg", &[0x1000, 0x100]);
        w.property_null("flag");
        w.property_u64("big", 0x1_0000_0002);
        w.end_node();
        w.end_node();
        w.finish()
    }

    #[test]
    fn written_tree_reads_back() {
        let blob = sample();
        let t = DeviceTree::parse(&blob).unwrap();
        assert_eq!(t.nodes().count(), 4);
        assert_eq!(t.property_u32(t.root(), "#address-cells"), Some(2));
        assert!(t.is_compatible(t.root(), "c,d"));
        assert!(!t.is_compatible(t.root(), "a"));
        let chosen = t.find("/chosen").unwrap();
        assert_eq!(t.property_str(chosen, "bootargs"), Some("console=hvc0"));
        let dev = t.find("/soc/dev@1000").unwrap();
        assert_eq!(t.name(dev), "dev@1000");
        assert_eq!(t.property(dev, "flag"), Some(&[][..]));
        assert_eq!(t.property(dev, "reg").map(<[u8]>::len), Some(16));
        assert_eq!(t.property_u64(dev, "big"), Some(0x1_0000_0002));
        assert_eq!(t.children(t.root()).count(), 2);
        assert!(t.find("/soc/none").is_none());
        assert!(t.find("soc").is_none());
    }

    #[test]
    fn header_of_the_written_blob_is_version_17() {
        let blob = sample();
        assert_eq!(header_word(&blob, 0), FDT_MAGIC);
        assert_eq!(header_word(&blob, 1) as usize, blob.len());
        assert_eq!(header_word(&blob, 5), 17);
    }

    #[test]
    fn every_truncation_is_refused() {
        let blob = sample();
        for len in 0..blob.len() {
            let mut cut = blob[..len].to_vec();
            if cut.len() >= 8 {
                // Keep totalsize consistent so that the structure checks are what refuses it.
                let total = cut.len() as u32;
                cut[4..8].copy_from_slice(&total.to_be_bytes());
            }
            assert!(DeviceTree::parse(&cut).is_err(), "prefix of {len} bytes");
        }
    }

    #[test]
    fn a_property_after_a_subnode_is_refused() {
        let mut w = Writer::new();
        w.begin_node("");
        w.begin_node("a");
        w.end_node();
        w.property_u32("late", 1);
        assert!(DeviceTree::parse(&w.finish()).is_err());
    }

    #[test]
    fn a_named_root_and_too_deep_trees_are_refused() {
        let mut w = Writer::new();
        w.begin_node("root");
        assert!(DeviceTree::parse(&w.finish()).is_err());
        let mut w = Writer::new();
        for _ in 0..=MAX_DEPTH {
            w.begin_node(if w.depth == 0 { "" } else { "n" });
        }
        assert!(DeviceTree::parse(&w.finish()).is_err());
    }
}
