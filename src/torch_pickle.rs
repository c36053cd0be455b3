//! Reads `torch.save(model.state_dict())` files strictly, executing nothing (like weights_only=True):
//! libtorch's own unpickler turns the `OrderedDict` into None (pytorch/pytorch#100741).

use anyhow::{anyhow, bail, ensure, Context, Result};
use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// A larger data.pkl is not a state dict. Every opcode reads at least one byte and adds at most
/// one node, stack slot or memo entry, so this one cap bounds them all.
const MAX_PICKLE_BYTES: u64 = 64 << 20;

/// Reads every named tensor of a torch.save'd dict onto the CPU, in the file's order.
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>> {
    read_zip(path).map_err(|e| anyhow!("{}: {e:#}", path.display()))
}

fn read_zip(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let mut zip = zip::ZipArchive::new(std::fs::File::open(path).context("cannot open")?)
        .context("not a readable zip archive")?;
    // Every entry lives under one top-level folder whose name is arbitrary.
    let prefix = zip
        .file_names()
        .find_map(|n| n.ok()?.strip_suffix("/data.pkl").filter(|p| !p.contains('/')).map(String::from))
        .context("no data.pkl inside: not a torch.save archive")?;
    let byteorder = format!("{prefix}/byteorder"); // absent in files older than PyTorch 1.10
    if zip.index_for_name(&byteorder).is_some() {
        let order = read_entry(&mut zip, &byteorder, 16)?;
        ensure!(order == b"little", "tensors stored {}-endian", String::from_utf8_lossy(&order));
    }
    ensure!(cfg!(target_endian = "little"), "this reader needs a little-endian machine");
    let views = parse(&read_entry(&mut zip, &format!("{prefix}/data.pkl"), MAX_PICKLE_BYTES)?)?;
    let mut storages: HashMap<String, (Storage, Tensor)> = HashMap::new(); // views may share a storage
    let mut out = Vec::with_capacity(views.len());
    for (name, view) in views {
        let s = &view.storage;
        if let Some((seen, _)) = storages.get(&s.key) {
            // Each view was checked against its own description of the storage: they must agree.
            ensure!(seen == s, "storage {} is described as both {:?} and {:?}", s.key, seen, s);
        } else {
            let bytes = (s.numel as u64).checked_mul(s.kind.elt_size_in_bytes() as u64).context("a storage too large")?;
            let data = read_entry(&mut zip, &format!("{prefix}/data/{}", s.key), bytes)?;
            let (key, got) = (&s.key, data.len());
            ensure!(got as u64 == bytes, "storage {key} holds {got} bytes, not {bytes} ({} x {:?})", s.numel, s.kind);
            ensure!(s.kind != Kind::Bool || data.iter().all(|&b| b <= 1), "storage {key} holds bools not 0 or 1");
            // from_data_size copies numel * element-size bytes without looking: checked just above.
            storages.insert(s.key.clone(), (s.clone(), Tensor::f_from_data_size(&data, &[s.numel], s.kind)?));
        }
        // parse() proved the view lies inside the storage, so as_strided reads nothing outside it.
        let strided = storages[&s.key].1.f_as_strided(view.size.as_slice(), view.stride.as_slice(), view.offset)?;
        let mut owned = Tensor::f_empty(view.size.as_slice(), (s.kind, Device::Cpu))?;
        owned.f_copy_(&strided)?; // contiguous, and owning its memory rather than a shared storage
        out.push((name, owned));
    }
    Ok(out)
}

/// Reads a whole zip entry, refusing one that declares or yields more than `limit` bytes.
fn read_entry<R: Read + Seek>(zip: &mut zip::ZipArchive<R>, entry: &str, limit: u64) -> Result<Vec<u8>> {
    let file = zip.by_name(entry).with_context(|| format!("no {entry} in the archive"))?;
    ensure!(file.size() <= limit, "{entry} is {} bytes, more than the {limit} expected", file.size());
    let mut data = Vec::with_capacity(file.size().min(MAX_PICKLE_BYTES) as usize); // the header may lie
    file.take(limit + 1).read_to_end(&mut data).with_context(|| format!("cannot read {entry}"))?;
    ensure!(data.len() as u64 <= limit, "{entry} is longer than the {limit} bytes expected");
    Ok(data)
}

#[derive(Debug, Clone, PartialEq)]
struct Storage {
    kind: Kind,
    key: String,
    numel: i64,
}

/// A tensor as the pickle describes it: a strided view of a storage, not yet read.
#[derive(Debug, Clone, PartialEq)]
struct View {
    storage: Storage,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildParameter,
    Storage(Kind),
}

/// Containers hold node ids, not values: BINGET shares like a Python reference, and nothing is
/// recursive, so no pickle can blow up memory by copying or the stack by nesting.
#[derive(Debug)]
enum Node {
    /// None, a bool or a float: a state dict never reads them, so only the type is kept.
    Other(&'static str),
    Int(i64),
    Str(String),
    Tuple(Vec<usize>),
    List(Vec<usize>),
    Dict(Vec<(usize, usize)>),
    Global(Global),
    Storage(Storage),
    Tensor(View),
}

impl Node {
    fn type_name(&self) -> &'static str {
        match self {
            Node::Other(name) => name,
            Node::Int(_) => "an int",
            Node::Str(_) => "a string",
            Node::Tuple(_) => "a tuple",
            Node::List(_) => "a list",
            Node::Dict(_) => "a dict",
            Node::Global(_) => "a class",
            Node::Storage(_) => "a storage",
            Node::Tensor(_) => "a tensor",
        }
    }
}

fn global(module: &str, name: &str) -> Result<Global> {
    let kind = match (module, name) {
        ("collections", "OrderedDict") => return Ok(Global::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => return Ok(Global::RebuildTensor),
        ("torch._utils", "_rebuild_parameter") => return Ok(Global::RebuildParameter),
        ("torch", "FloatStorage") => Kind::Float,
        ("torch", "DoubleStorage") => Kind::Double,
        ("torch", "HalfStorage") => Kind::Half,
        ("torch", "BFloat16Storage") => Kind::BFloat16,
        ("torch", "LongStorage") => Kind::Int64,
        ("torch", "IntStorage") => Kind::Int,
        ("torch", "ShortStorage") => Kind::Int16,
        ("torch", "CharStorage") => Kind::Int8,
        ("torch", "ByteStorage") => Kind::Uint8,
        ("torch", "BoolStorage") => Kind::Bool,
        _ => bail!(
            "refuses to load {module}.{name}: only tensors and dicts of tensors are read \
             (like torch.load(weights_only=True))"
        ),
    };
    Ok(Global::Storage(kind))
}

#[derive(Default)]
struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    nodes: Vec<Node>,
    stack: Vec<usize>,
    marks: Vec<usize>,
    memo: HashMap<u32, usize>,
}

impl<'a> Unpickler<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let data: &'a [u8] = self.data;
        let bytes = self.pos.checked_add(n).and_then(|end| data.get(self.pos..end));
        let bytes = bytes.with_context(|| format!("data.pkl is truncated or damaged at byte {}", self.pos))?;
        self.pos += n;
        Ok(bytes)
    }
    fn uint(&mut self, n: usize) -> Result<u64> {
        Ok(self.take(n)?.iter().rev().fold(0, |acc, &b| acc << 8 | b as u64)) // little-endian
    }
    fn len(&mut self, n: usize) -> Result<usize> {
        usize::try_from(self.uint(n)?).context("a length beyond memory")
    }
    fn string(&mut self, n: usize) -> Result<String> {
        let len = self.len(n)?;
        String::from_utf8(self.take(len)?.to_vec()).context("a string that is not UTF-8")
    }
    fn line(&mut self) -> Result<String> {
        let end = self.data.iter().skip(self.pos).position(|&b| b == b'\n').context("data.pkl ends in a GLOBAL")?;
        let line = std::str::from_utf8(self.take(end + 1)?).context("a global name that is not UTF-8")?;
        Ok(line[..end].to_string())
    }
    fn push(&mut self, node: Node) {
        self.nodes.push(node);
        self.stack.push(self.nodes.len() - 1);
    }
    fn pop(&mut self) -> Result<usize> {
        let floor = self.marks.last().copied().unwrap_or(0);
        ensure!(self.stack.len() > floor, "pops past a MARK or an empty stack");
        self.stack.pop().context("pops an empty stack")
    }
    fn pop_mark(&mut self) -> Result<Vec<usize>> {
        let mark = self.marks.pop().context("no MARK to pop to")?;
        Ok(self.stack.split_off(mark.min(self.stack.len())))
    }
    fn top(&mut self) -> Result<&mut Node> {
        let id = *self.stack.last().context("an empty stack")?;
        Ok(&mut self.nodes[id]) // every id on the stack indexes `nodes`
    }
    fn memoize(&mut self, i: u32) -> Result<()> {
        let id = *self.stack.last().context("memoizes an empty stack")?;
        self.memo.insert(i, id);
        Ok(())
    }
    fn int(&self, id: usize) -> Result<i64> {
        let Node::Int(i) = self.nodes[id] else { bail!("expected an int, found {}", self.nodes[id].type_name()) };
        Ok(i)
    }
    fn str(&self, id: usize) -> Result<&str> {
        let Node::Str(s) = &self.nodes[id] else { bail!("expected a string, found {}", self.nodes[id].type_name()) };
        Ok(s)
    }
    fn tuple(&self, id: usize) -> Result<&[usize]> {
        let Node::Tuple(t) = &self.nodes[id] else { bail!("expected a tuple, found {}", self.nodes[id].type_name()) };
        Ok(t)
    }
    fn ints(&self, id: usize) -> Result<Vec<i64>> {
        self.tuple(id)?.iter().map(|&i| self.int(i)).collect()
    }

    /// `('storage', <storage class>, key, location, numel)`; the location is ignored (CPU).
    fn persistent_load(&self, pid: usize) -> Result<Node> {
        let &[tag, class, key, _location, numel] = self.tuple(pid)? else { bail!("a persistent id not of 5 items") };
        ensure!(self.str(tag)? == "storage", "a persistent id that is not a storage");
        let Node::Global(Global::Storage(kind)) = self.nodes[class] else { bail!("a storage of no known type") };
        let (key, numel) = (self.str(key)?.to_string(), self.int(numel)?);
        ensure!(numel >= 0, "storage {key} has a negative size");
        Ok(Node::Storage(Storage { kind, key, numel }))
    }

    /// `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`,
    /// checked here so that libtorch never reads outside the storage.
    fn rebuild_tensor(&self, args: &[usize]) -> Result<Node> {
        let (&[storage, offset, size, stride, ..], 6..=7) = (args, args.len()) else {
            bail!("_rebuild_tensor_v2 with {} arguments", args.len())
        };
        let Node::Storage(storage) = &self.nodes[storage] else { bail!("_rebuild_tensor_v2 of a non-storage") };
        let (offset, size, stride) = (self.int(offset)?, self.ints(size)?, self.ints(stride)?);
        let (dims, strides) = (size.len(), stride.len());
        ensure!(dims == strides && dims <= 64, "a tensor with {dims} sizes and {strides} strides");
        ensure!(offset >= 0 && size.iter().chain(&stride).all(|&x| x >= 0), "a negative size, stride or offset");
        let numel = size.iter().try_fold(1i64, |n, &s| n.checked_mul(s));
        // The last element a view reads: offset + sum((size - 1) * stride).
        let last = size.iter().zip(&stride).try_fold(offset, |end, (&n, &s)| end.checked_add((n - 1).max(0).checked_mul(s)?));
        let inside = match (numel, last) {
            (Some(0), _) => offset <= storage.numel, // an empty tensor reads nothing
            (Some(_), Some(last)) => last < storage.numel,
            _ => false,
        };
        let (key, len) = (&storage.key, storage.numel);
        ensure!(inside, "a tensor of size {size:?}, stride {stride:?}, offset {offset} lies outside storage {key} ({len} items)");
        Ok(Node::Tensor(View { storage: storage.clone(), offset, size, stride }))
    }

    fn reduce(&mut self) -> Result<()> {
        let args = self.pop()?;
        let func = self.pop()?;
        let args = self.tuple(args)?.to_vec();
        let node = match self.nodes[func] {
            Node::Global(Global::OrderedDict) if args.is_empty() => Node::Dict(Vec::new()),
            Node::Global(Global::RebuildTensor) => self.rebuild_tensor(&args)?,
            Node::Global(Global::RebuildParameter) => match args[..] {
                [tensor, _, _] if matches!(self.nodes[tensor], Node::Tensor(_)) => {
                    self.stack.push(tensor); // the Parameter is its tensor: no new node
                    return Ok(());
                }
                _ => bail!("_rebuild_parameter without a tensor"),
            },
            ref other => bail!("cannot call {} with {} arguments", other.type_name(), args.len()),
        };
        self.push(node);
        Ok(())
    }

    fn set_items(&mut self, items: Vec<usize>) -> Result<()> {
        ensure!(items.len().is_multiple_of(2), "SETITEMS with an odd number of items");
        let Node::Dict(dict) = self.top()? else { bail!("SETITEM on a non-dict") };
        dict.extend(items.chunks_exact(2).map(|kv| (kv[0], kv[1])));
        Ok(())
    }

    /// Runs the pickle to its STOP and returns the node it built. Opcode names as in pickletools.
    fn run(&mut self) -> Result<usize> {
        loop {
            let at = self.pos;
            let op = self.uint(1)? as u8;
            let width = |short: u8| if op == short { 1 } else { 4 }; // 1- and 4-byte argument pairs
            match op {
                0x80 => ensure!(self.uint(1)? <= 5, "pickle protocol above 5"), // PROTO
                0x95 => drop(self.uint(8)?),                                    // FRAME: a hint only
                b'.' => return self.pop(),                                      // STOP
                b'(' => self.marks.push(self.stack.len()),                      // MARK
                b'N' => self.push(Node::Other("None")),
                0x88 | 0x89 => self.push(Node::Other("a bool")), // NEWTRUE, NEWFALSE
                b'G' => self.take(8).map(|_| self.push(Node::Other("a float")))?, // BINFLOAT
                b'J' => self.uint(4).map(|v| self.push(Node::Int(v as u32 as i32 as i64)))?, // BININT
                b'K' | b'M' => { // BININT1, BININT2: unsigned
                    let v = self.uint(if op == b'K' { 1 } else { 2 })?;
                    self.push(Node::Int(v as i64))
                }
                0x8a => { // LONG1: n bytes of little-endian two's complement
                    let n = self.len(1)?;
                    ensure!(n <= 8, "an integer of {n} bytes");
                    let shift = 64 - 8 * n as u32;
                    let v = self.uint(n)?.checked_shl(shift).map_or(0, |v| (v as i64) >> shift);
                    self.push(Node::Int(v))
                }
                b'X' | 0x8c | 0x8d => { // BINUNICODE, SHORT_BINUNICODE, BINUNICODE8
                    let s = self.string(match op { b'X' => 4, 0x8c => 1, _ => 8 })?;
                    self.push(Node::Str(s))
                }
                b')' => self.push(Node::Tuple(Vec::new())),                  // EMPTY_TUPLE
                b't' => self.pop_mark().map(|t| self.push(Node::Tuple(t)))?, // TUPLE
                0x85..=0x87 => { // TUPLE1, TUPLE2, TUPLE3
                    let mut items = (0x85..=op).map(|_| self.pop()).collect::<Result<Vec<_>>>()?;
                    items.reverse();
                    self.push(Node::Tuple(items))
                }
                b']' => self.push(Node::List(Vec::new())), // EMPTY_LIST
                b'a' | b'e' => { // APPEND, APPENDS
                    let items = if op == b'a' { vec![self.pop()?] } else { self.pop_mark()? };
                    let Node::List(list) = self.top()? else { bail!("APPEND to a non-list") };
                    list.extend(items)
                }
                b'}' => self.push(Node::Dict(Vec::new())), // EMPTY_DICT
                b's' => { // SETITEM
                    let (v, k) = (self.pop()?, self.pop()?);
                    self.set_items(vec![k, v])?
                }
                b'u' => self.pop_mark().and_then(|items| self.set_items(items))?, // SETITEMS
                b'q' | b'r' => self.uint(width(b'q')).and_then(|i| self.memoize(i as u32))?, // BINPUT, LONG_BINPUT
                0x94 => self.memoize(self.memo.len() as u32)?,                              // MEMOIZE
                b'h' | b'j' => { // BINGET, LONG_BINGET
                    let i = self.uint(width(b'h'))? as u32;
                    let id = *self.memo.get(&i).with_context(|| format!("memo {i} read before it was written"))?;
                    self.stack.push(id)
                }
                b'c' => { // GLOBAL: "module\nname\n"
                    let (module, name) = (self.line()?, self.line()?);
                    self.push(Node::Global(global(&module, &name)?))
                }
                0x93 => { // STACK_GLOBAL
                    let (name, module) = (self.pop()?, self.pop()?);
                    let g = global(self.str(module)?, self.str(name)?)?;
                    self.push(Node::Global(g))
                }
                b'R' => self.reduce()?,
                b'b' => { // BUILD: only an OrderedDict's `_metadata`, which a state dict does not need.
                    self.pop()?;
                    ensure!(matches!(self.top()?, Node::Dict(_)), "BUILD on something other than a dict");
                }
                b'Q' => self.pop().and_then(|pid| self.persistent_load(pid)).map(|s| self.push(s))?, // BINPERSID
                _ => bail!("unsupported pickle opcode 0x{op:02x} at byte {at}"),
            }
        }
    }
}

/// Parses data.pkl into named tensor views, in the dict's order.
fn parse(pkl: &[u8]) -> Result<Vec<(String, View)>> {
    let mut u = Unpickler { data: pkl, ..Default::default() };
    let root = u.run()?;
    let Node::Dict(items) = &u.nodes[root] else { bail!("holds {}, not a dict of tensors", u.nodes[root].type_name()) };
    let keys: Vec<&str> = items.iter().map(|&(k, _)| u.str(k)).collect::<Result<_>>()?;
    if !items.iter().all(|&(_, v)| matches!(u.nodes[v], Node::Tensor(_))) {
        let shown: Vec<String> = keys.iter().take(20).map(|k| format!("{k:?}")).collect();
        bail!(
            "holds a dict whose values are not all tensors (keys: {}); save model.state_dict() itself \
             (--key-map only renames keys)",
            shown.join(", ")
        );
    }
    let mut seen = HashSet::new();
    let views = keys.iter().zip(items).map(|(k, &(_, v))| match &u.nodes[v] {
        Node::Tensor(view) if seen.insert(*k) => Ok((k.to_string(), view.clone())),
        _ => bail!("the key {k:?} appears twice"),
    });
    views.collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(text: &str) -> Vec<u8> {
        [&[0x8c, text.len() as u8][..], text.as_bytes()].concat() // SHORT_BINUNICODE
    }

    /// What torch.save writes (protocol 2) for `{"w": storage[offset..offset+2]}` of a
    /// 4-float storage, built by hand.
    fn state_dict(offset: u8, module: &str, name: &str) -> Vec<u8> {
        [
            &b"\x80\x02}("[..],
            &s("w"),
            format!("c{module}\n{name}\n(").as_bytes(),
            b"(",
            &s("storage"),
            b"ctorch\nFloatStorage\n",
            &s("0"),
            &s("cpu"),
            b"K\x04tQK",
            &[offset],
            b"K\x02\x85K\x01\x85\x89}tRu.",
        ]
        .concat()
    }

    #[test]
    fn a_hand_built_state_dict_parses_to_its_view() {
        let views = parse(&state_dict(2, "torch._utils", "_rebuild_tensor_v2")).unwrap();
        let storage = Storage { kind: Kind::Float, key: "0".into(), numel: 4 };
        assert_eq!(views, [("w".to_string(), View { storage, offset: 2, size: vec![2], stride: vec![1] })]);
    }

    #[test]
    fn bad_pickles_give_the_reason() {
        let cases: [(&[u8], &str); 6] = [
            (
                &state_dict(3, "torch._utils", "_rebuild_tensor_v2"),
                "a tensor of size [2], stride [1], offset 3 lies outside storage 0 (4 items)",
            ),
            (&state_dict(0, "os", "system"), "refuses to load os.system: only tensors and dicts of tensors are read"),
            (b"\x80\x02}q\x00\xff", "unsupported pickle opcode 0xff at byte 5"),
            (b"\x80\x02K\x01.", "holds an int, not a dict of tensors"),
            (b"\x80\x02}X\x00\x00\x00\x80", "data.pkl is truncated or damaged at byte 8"),
            (b"\x80\x02(}t.", "holds a tuple, not a dict of tensors"),
        ];
        for (pkl, expected) in cases {
            let err = parse(pkl).unwrap_err().to_string();
            assert!(err.contains(expected), "{expected:?} not in {err:?}");
        }
    }

    #[test]
    fn every_truncation_and_mutation_is_an_error_or_an_in_bounds_view_never_a_panic() {
        let good = state_dict(1, "torch._utils", "_rebuild_tensor_v2");
        for end in 0..good.len() {
            assert!(parse(&good[..end]).is_err(), "a pickle cut at {end} parsed");
        }
        let mut seed = 0x2545_f491_4f6c_dd1du64; // xorshift: reproducible mutations
        for _ in 0..20_000 {
            let mut pkl = good.clone();
            for _ in 0..1 + seed % 4 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let at = (seed >> 8) as usize % pkl.len();
                pkl[at] = (seed >> 40) as u8;
            }
            for (_, v) in parse(&pkl).unwrap_or_default() {
                let last: i64 = v.offset + v.size.iter().zip(&v.stride).map(|(n, s)| (n - 1).max(0) * s).sum::<i64>();
                assert!(last < v.storage.numel || v.size.contains(&0), "{v:?} escapes its storage");
            }
        }
    }
}
