//! torch.save files as data: [`read`] turns one into a [`Value`] executing nothing (the globals
//! torch.load(weights_only=True) allows, and no others), [`write`] makes one torch.load reads.
//! libtorch's own unpickler turns a state dict's `OrderedDict` into None (pytorch/pytorch#100741).

use anyhow::{anyhow, bail, ensure, Context, Result};
use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, Write};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// A larger data.pkl is not a state dict. Every opcode reads at least one byte and adds at most
/// one node, stack slot or memo entry, so this one cap bounds them all.
const MAX_PICKLE_BYTES: u64 = 64 << 20;
/// Containers nest deeper than this in no checkpoint (a whole module: about 3 per submodule);
/// the cap keeps reading, writing and dropping a [`Value`] off the end of the stack.
const MAX_DEPTH: usize = 256;
/// Memo references can share one container many times over; unshared, the values a pickle
/// describes may take at most this many bytes.
const MAX_VALUE_BYTES: usize = 256 << 20;
/// torch.save starts every zip record on a 64-byte boundary (`.storage_alignment`), so that
/// torch.load(mmap=True) can map tensors in place.
const ALIGNMENT: u16 = 64;

/// A Python value of the kinds torch.save'd checkpoints hold: what `torch.load(path,
/// weights_only=True)` returns, with tensors on the CPU.
#[derive(Debug)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    /// A dict or OrderedDict, in insertion order; its keys are `Str` or `Int`.
    Dict(Vec<(Value, Value)>),
    Tensor(Tensor),
}

impl Value {
    /// The entry under the string key `key`, if this is a dict that has one.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.as_dict()?.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v)
    }
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
    /// A float, or an int widened to one (Python writes `lr=1` as an int).
    pub fn as_float(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }
    pub fn as_dict(&self) -> Option<&[(Value, Value)]> {
        match self {
            Value::Dict(d) => Some(d),
            _ => None,
        }
    }
    /// The items of a list or a tuple.
    pub fn as_list(&self) -> Option<&[Value]> {
        match self {
            Value::List(l) | Value::Tuple(l) => Some(l),
            _ => None,
        }
    }
    pub fn as_tensor(&self) -> Option<&Tensor> {
        match self {
            Value::Tensor(t) => Some(t),
            _ => None,
        }
    }
    /// The entries of a dict whose keys are all strings and values all tensors: a state dict.
    pub fn as_state_dict(&self) -> Option<Vec<(&str, &Tensor)>> {
        self.as_dict()?.iter().map(|(k, v)| Some((k.as_str()?, v.as_tensor()?))).collect()
    }
    /// The same, taken out; the value itself back unless every key is a string and every value
    /// a tensor.
    pub fn into_state_dict(self) -> Result<Vec<(String, Tensor)>, Value> {
        if self.as_state_dict().is_none() {
            return Err(self);
        }
        let Value::Dict(items) = self else { return Err(self) };
        let pairs = items.into_iter().filter_map(|(k, v)| match (k, v) {
            (Value::Str(k), Value::Tensor(t)) => Some((k, t)),
            _ => None, // as_state_dict saw none of these
        });
        Ok(pairs.collect())
    }
    /// A dict key as Python prints it, for messages: `"epoch"`, `0`.
    pub fn key_repr(&self) -> String {
        match self {
            Value::Str(s) => format!("{s:?}"),
            Value::Int(i) => i.to_string(),
            other => other.type_name().to_string(),
        }
    }
    /// The Python type, for messages: `a tensor`, `a dict`.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "a bool",
            Value::Int(_) => "an int",
            Value::Float(_) => "a float",
            Value::Str(_) => "a string",
            Value::List(_) => "a list",
            Value::Tuple(_) => "a tuple",
            Value::Dict(_) => "a dict",
            Value::Tensor(_) => "a tensor",
        }
    }
}

/// Reads any torch.save file of [`Value`]s, tensors onto the CPU. Nothing in it is executed: a
/// class or function torch.load(weights_only=True) would not allow is refused by name.
pub fn read(path: &Path) -> Result<Value> {
    Ok(read_archive(path, Objects::Refused)?.value)
}

/// [`read`] for a torch.save file held in memory (one stored inside another archive).
pub fn read_bytes(data: &[u8]) -> Result<Value> {
    let zip = open_zip(std::io::Cursor::new(data)).context("not a readable zip archive")?;
    Ok(read_from(zip, Objects::Refused)?.value)
}

/// Reads every named tensor of a torch.save'd dict of tensors (a state dict), in the file's order.
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let value = read(path)?;
    state_dict(value).map_err(|e| anyhow!("{}: {e:#}", path.display()))
}

/// What [`read_model`] found: the file's value with each pickled `nn.Module` in it replaced by
/// the dict its `state_dict()` returns, and the classes of those modules (outermost only).
#[derive(Debug)]
pub struct ModelPickle {
    pub value: Value,
    pub modules: Vec<String>,
}

/// Reads a torch.save file that may hold whole modules (`torch.save(model)`), as data: objects
/// of classes torch.load(weights_only=True) refuses become inert nodes (nothing imported, nothing
/// called); a module's parameters and persistent buffers are taken from its pickled attributes,
/// named by module path (`conv1.weight`, `features.0.bias`). Other objects read as None; one at
/// the top of the file is refused by its class.
pub fn read_model(path: &Path) -> Result<ModelPickle> {
    read_archive(path, Objects::Inert)
}

/// How the unpickler treats a global outside the allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
enum Objects {
    #[default]
    Refused,
    /// Kept as an inert class node; calling it makes an object node holding its arguments.
    Inert,
}

fn read_archive(path: &Path, objects: Objects) -> Result<ModelPickle> {
    let read = || {
        let zip = open_zip(std::fs::File::open(path).context("cannot open")?).context("not a readable zip archive")?;
        read_from(zip, objects)
    };
    read().map_err(|e| anyhow!("{}: {e:#}", path.display()))
}

fn read_from<R: Read + Seek>(mut zip: zip::ZipArchive<R>, objects: Objects) -> Result<ModelPickle> {
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
    let pkl = read_entry(&mut zip, &format!("{prefix}/data.pkl"), MAX_PICKLE_BYTES)?;
    let mut u = Unpickler { data: &pkl, objects, ..Default::default() };
    let root = u.run()?;
    let mut b = Builder {
        u: &u,
        zip: &mut zip,
        prefix,
        described: HashMap::new(),
        storages: Storages::default(),
        tensors: HashMap::new(),
        spent: 0,
        modules: Vec::new(),
    };
    let value = b.value(root, 0)?;
    Ok(ModelPickle { value, modules: b.modules })
}

/// The named tensors of a dict of tensors, refusing anything else with what it holds.
fn state_dict(value: Value) -> Result<Vec<(String, Tensor)>> {
    let Value::Dict(items) = &value else { bail!("holds {}, not a dict of tensors", value.type_name()) };
    let shown: Vec<String> = items.iter().take(20).map(|(k, _)| k.key_repr()).collect();
    value.into_state_dict().map_err(|_| {
        anyhow!(
            "holds a dict whose values are not all tensors (keys: {}); save model.state_dict() itself \
             (a key map only renames keys)",
            shown.join(", ")
        )
    })
}

/// Opens a zip that PyTorch wrote, which starts at byte 0. The zip crate's default looks for
/// data prepended to the archive and can take the end record of a zip stored inside (a `.pt2`
/// keeps a torch.save file of sample inputs) for the outer one's: "Invalid Central Directory header".
pub fn open_zip<R: Read + Seek>(reader: R) -> zip::result::ZipResult<zip::ZipArchive<R>> {
    let config = zip::read::Config { archive_offset: zip::read::ArchiveOffset::Known(0) };
    zip::ZipArchive::with_config(config, reader)
}

/// Reads a whole zip entry, refusing one that declares or yields more than `limit` bytes.
pub fn read_entry<R: Read + Seek>(zip: &mut zip::ZipArchive<R>, entry: &str, limit: u64) -> Result<Vec<u8>> {
    let file = zip.by_name(entry).with_context(|| format!("no {entry} in the archive"))?;
    ensure!(file.size() <= limit, "{entry} is {} bytes, more than the {limit} expected", file.size());
    let mut data = Vec::with_capacity(file.size().min(MAX_PICKLE_BYTES) as usize); // the header may lie
    file.take(limit + 1).read_to_end(&mut data).with_context(|| format!("cannot read {entry}"))?;
    ensure!(data.len() as u64 <= limit, "{entry} is longer than the {limit} bytes expected");
    Ok(data)
}

/// The storage classes torch.save names (`torch.FloatStorage`), both ways.
const STORAGES: [(&str, Kind); 10] = [
    ("FloatStorage", Kind::Float),
    ("DoubleStorage", Kind::Double),
    ("HalfStorage", Kind::Half),
    ("BFloat16Storage", Kind::BFloat16),
    ("LongStorage", Kind::Int64),
    ("IntStorage", Kind::Int),
    ("ShortStorage", Kind::Int16),
    ("CharStorage", Kind::Int8),
    ("ByteStorage", Kind::Uint8),
    ("BoolStorage", Kind::Bool),
];

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
    /// `_rebuild_parameter(tensor, requires_grad, hooks)`, or `_with_state` with a 4th argument.
    RebuildParameter,
    /// `torch.Size(tuple)`: read as the tuple.
    Size,
    Storage(Kind),
}

/// Containers hold node ids, not values: BINGET shares like a Python reference, and the
/// unpickler recurses nowhere, so no pickle can blow up memory by copying or the stack by nesting.
#[derive(Debug)]
enum Node {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Vec<usize>),
    List(Vec<usize>),
    Dict(Vec<(usize, usize)>),
    Global(Global),
    Storage(Storage),
    Tensor(View),
    /// A global outside the allow-list (only with [`Objects::Inert`]): `module.name`.
    Class(String),
    /// What calling a `Class` would have made: never made, only described.
    Object {
        class: String,
        args: usize,
        state: Option<usize>,
    },
}

impl Node {
    fn type_name(&self) -> &'static str {
        match self {
            Node::None => "None",
            Node::Bool(_) => "a bool",
            Node::Int(_) => "an int",
            Node::Float(_) => "a float",
            Node::Str(_) => "a string",
            Node::Tuple(_) => "a tuple",
            Node::List(_) => "a list",
            Node::Dict(_) => "a dict",
            Node::Global(_) | Node::Class(_) => "a class",
            Node::Storage(_) => "a storage",
            Node::Tensor(_) => "a tensor",
            Node::Object { .. } => "an object",
        }
    }
}

fn global(module: &str, name: &str) -> Option<Global> {
    let kind = match (module, name) {
        ("collections", "OrderedDict") => return Some(Global::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => return Some(Global::RebuildTensor),
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
            return Some(Global::RebuildParameter)
        }
        ("torch", "Size") => return Some(Global::Size),
        ("torch", storage) => STORAGES.iter().find(|(n, _)| *n == storage)?.1,
        _ => return None,
    };
    Some(Global::Storage(kind))
}

#[derive(Default)]
struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    objects: Objects,
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

    /// A GLOBAL: an allowed one, else (reading objects) an inert class, else refused by name.
    fn global(&mut self, module: &str, name: &str) -> Result<()> {
        let node = match (global(module, name), self.objects) {
            (Some(g), _) => Node::Global(g),
            (None, Objects::Inert) => Node::Class(format!("{module}.{name}")),
            (None, Objects::Refused) => bail!(
                "refuses to load {module}.{name}: only tensors, numbers, strings and containers of them \
                 are read (like torch.load(weights_only=True))"
            ),
        };
        self.push(node);
        Ok(())
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
        check_view(&format!("storage {}", storage.key), storage.numel, &size, &stride, offset)?;
        Ok(Node::Tensor(View { storage: storage.clone(), offset, size, stride }))
    }

    /// REDUCE, NEWOBJ and NEWOBJ_EX: `func(*args)` for the few allowed functions, an inert
    /// object for a class outside the allow-list.
    fn call(&mut self, func: usize, args: usize) -> Result<()> {
        let arg_ids = self.tuple(args)?.to_vec();
        let node = match &self.nodes[func] {
            Node::Global(Global::OrderedDict) if arg_ids.is_empty() => Node::Dict(Vec::new()),
            Node::Global(Global::RebuildTensor) => self.rebuild_tensor(&arg_ids)?,
            // The Parameter and the Size are their tensor and tuple: no new node.
            Node::Global(Global::RebuildParameter) => match arg_ids[..] {
                [tensor, _, _] | [tensor, _, _, _] if matches!(self.nodes[tensor], Node::Tensor(_)) => {
                    self.stack.push(tensor);
                    return Ok(());
                }
                _ => bail!("_rebuild_parameter without a tensor"),
            },
            Node::Global(Global::Size) => match arg_ids[..] {
                [sizes] if self.ints(sizes).is_ok() => {
                    self.stack.push(sizes);
                    return Ok(());
                }
                _ => bail!("torch.Size of something other than a tuple of ints"),
            },
            Node::Class(class) => Node::Object { class: class.clone(), args, state: None },
            other => bail!("cannot call {} with {} arguments", other.type_name(), arg_ids.len()),
        };
        self.push(node);
        Ok(())
    }

    /// BUILD: an object's state (its `__dict__`) is kept; an OrderedDict's `_metadata` is not
    /// needed; nothing else is built.
    fn build(&mut self) -> Result<()> {
        let state = self.pop()?;
        match self.top()? {
            Node::Dict(_) => {}
            Node::Object { state: slot @ None, .. } => *slot = Some(state),
            other => bail!("BUILD on {}", other.type_name()),
        }
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
                b'N' => self.push(Node::None),
                0x88 | 0x89 => self.push(Node::Bool(op == 0x88)), // NEWTRUE, NEWFALSE
                b'G' => {
                    // BINFLOAT: big-endian, unlike every other number in a pickle
                    let bytes: [u8; 8] = self.take(8)?.try_into().context("8 bytes")?;
                    self.push(Node::Float(f64::from_be_bytes(bytes)))
                }
                b'J' => self.uint(4).map(|v| self.push(Node::Int(v as u32 as i32 as i64)))?, // BININT
                b'K' | b'M' => {
                    // BININT1, BININT2: unsigned
                    let v = self.uint(if op == b'K' { 1 } else { 2 })?;
                    self.push(Node::Int(v as i64))
                }
                0x8a => {
                    // LONG1: n bytes of little-endian two's complement
                    let n = self.len(1)?;
                    ensure!(n <= 8, "an integer of {n} bytes, beyond 64 bits");
                    let shift = 64 - 8 * n as u32;
                    let v = self.uint(n)?.checked_shl(shift).map_or(0, |v| (v as i64) >> shift);
                    self.push(Node::Int(v))
                }
                b'X' | 0x8c | 0x8d => {
                    // BINUNICODE, SHORT_BINUNICODE, BINUNICODE8
                    let s = self.string(match op {
                        b'X' => 4,
                        0x8c => 1,
                        _ => 8,
                    })?;
                    self.push(Node::Str(s))
                }
                b')' => self.push(Node::Tuple(Vec::new())), // EMPTY_TUPLE
                b't' => self.pop_mark().map(|t| self.push(Node::Tuple(t)))?, // TUPLE
                0x85..=0x87 => {
                    // TUPLE1, TUPLE2, TUPLE3
                    let mut items = (0x85..=op).map(|_| self.pop()).collect::<Result<Vec<_>>>()?;
                    items.reverse();
                    self.push(Node::Tuple(items))
                }
                b']' => self.push(Node::List(Vec::new())), // EMPTY_LIST
                b'a' | b'e' => {
                    // APPEND, APPENDS
                    let items = if op == b'a' { vec![self.pop()?] } else { self.pop_mark()? };
                    let Node::List(list) = self.top()? else { bail!("APPEND to a non-list") };
                    list.extend(items)
                }
                b'}' => self.push(Node::Dict(Vec::new())), // EMPTY_DICT
                b's' => {
                    // SETITEM
                    let (v, k) = (self.pop()?, self.pop()?);
                    self.set_items(vec![k, v])?
                }
                b'u' => self.pop_mark().and_then(|items| self.set_items(items))?, // SETITEMS
                b'q' | b'r' => self.uint(width(b'q')).and_then(|i| self.memoize(i as u32))?, // BINPUT, LONG_BINPUT
                0x94 => self.memoize(self.memo.len() as u32)?,                    // MEMOIZE
                b'h' | b'j' => {
                    // BINGET, LONG_BINGET
                    let i = self.uint(width(b'h'))? as u32;
                    let id = *self.memo.get(&i).with_context(|| format!("memo {i} read before it was written"))?;
                    self.stack.push(id)
                }
                b'c' => {
                    // GLOBAL: "module\nname\n"
                    let (module, name) = (self.line()?, self.line()?);
                    self.global(&module, &name)?
                }
                0x93 => {
                    // STACK_GLOBAL
                    let (name, module) = (self.pop()?, self.pop()?);
                    let (module, name) = (self.str(module)?.to_string(), self.str(name)?.to_string());
                    self.global(&module, &name)?
                }
                b'R' | 0x81 => {
                    // REDUCE, NEWOBJ
                    let (args, func) = (self.pop()?, self.pop()?);
                    self.call(func, args)?
                }
                0x92 => {
                    // NEWOBJ_EX: the keyword arguments are kept by no allowed call
                    let (_kwargs, args, class) = (self.pop()?, self.pop()?, self.pop()?);
                    self.call(class, args)?
                }
                b'b' => self.build()?,
                b'Q' => self.pop().and_then(|pid| self.persistent_load(pid)).map(|s| self.push(s))?, // BINPERSID
                _ => bail!("unsupported pickle opcode 0x{op:02x} at byte {at}"),
            }
        }
    }
}

/// Turns the unpickled nodes into [`Value`]s, reading each storage once from the archive.
struct Builder<'u, 'a, R> {
    u: &'u Unpickler<'a>,
    zip: &'u mut zip::ZipArchive<R>,
    prefix: String,
    /// Each storage as the first view of it describes it (its data is in `storages`).
    described: HashMap<String, Storage>,
    storages: Storages,
    /// Tensors already built, by node: a tensor referenced twice is one tensor (shallow clones).
    tensors: HashMap<usize, Tensor>,
    /// The estimated memory of the values built so far (see [`MAX_VALUE_BYTES`]).
    spent: usize,
    modules: Vec<String>,
}

impl<R: Read + Seek> Builder<'_, '_, R> {
    fn spend(&mut self, bytes: usize) -> Result<()> {
        self.spent += std::mem::size_of::<Value>() + bytes;
        ensure!(self.spent <= MAX_VALUE_BYTES, "its values would take more than {} MiB", MAX_VALUE_BYTES >> 20);
        Ok(())
    }

    fn value(&mut self, id: usize, depth: usize) -> Result<Value> {
        ensure!(depth <= MAX_DEPTH, "containers nested more than {MAX_DEPTH} deep");
        let u = self.u;
        self.spend(if let Node::Str(s) = &u.nodes[id] { s.len() } else { 0 })?;
        Ok(match &u.nodes[id] {
            Node::None => Value::None,
            Node::Bool(b) => Value::Bool(*b),
            Node::Int(i) => Value::Int(*i),
            Node::Float(f) => Value::Float(*f),
            Node::Str(s) => Value::Str(s.clone()),
            Node::Tuple(items) => Value::Tuple(items.iter().map(|&i| self.value(i, depth + 1)).collect::<Result<_>>()?),
            Node::List(items) => Value::List(items.iter().map(|&i| self.value(i, depth + 1)).collect::<Result<_>>()?),
            Node::Dict(items) => {
                let mut seen = HashSet::new(); // `"0"` and `0` are different keys
                let mut dict = Vec::with_capacity(items.len());
                for &(k, v) in items {
                    let key = match &u.nodes[k] {
                        Node::Str(s) => Value::Str(s.clone()),
                        Node::Int(i) => Value::Int(*i),
                        other => bail!("a dict key that is {}: only string and int keys are read", other.type_name()),
                    };
                    ensure!(
                        seen.insert((key.as_str().is_some(), key.key_repr())),
                        "the key {} appears twice",
                        key.key_repr()
                    );
                    dict.push((key, self.value(v, depth + 1)?));
                }
                Value::Dict(dict)
            }
            Node::Tensor(_) => Value::Tensor(self.tensor(id)?),
            Node::Object { class, state, .. } => match self.module_state(*state) {
                Some(state) => {
                    self.modules.push(class.clone());
                    let mut tensors = Vec::new();
                    self.module_tensors(state, "", &mut tensors, depth)?;
                    Value::Dict(tensors.into_iter().map(|(k, t)| (Value::Str(k), Value::Tensor(t))).collect())
                }
                None if depth == 0 => bail!("holds a {class} object, not a state dict or an nn.Module"),
                None => Value::None, // never built, so never run: only modules hold weights
            },
            Node::Global(_) | Node::Class(_) | Node::Storage(_) => {
                bail!("holds {} as a value", u.nodes[id].type_name())
            }
        })
    }

    /// An object's state if it is an `nn.Module`'s `__dict__`: it has `_parameters` and `_modules`.
    fn module_state(&self, state: Option<usize>) -> Option<usize> {
        let state = state?;
        let is_dict = |name| matches!(self.attribute(state, name).map(|id| &self.u.nodes[id]), Some(Node::Dict(_)));
        (is_dict("_parameters") && is_dict("_modules")).then_some(state)
    }

    /// A module's entry `name` in its `__dict__`, if it is there.
    fn attribute(&self, state: usize, name: &str) -> Option<usize> {
        let Node::Dict(items) = &self.u.nodes[state] else { return None };
        items.iter().find(|&&(k, _)| self.u.str(k).is_ok_and(|s| s == name)).map(|&(_, v)| v)
    }

    /// What `module.state_dict()` returns, from a pickled module's `__dict__`: its parameters,
    /// its persistent buffers, then each submodule's, prefixed by the path to it.
    fn module_tensors(
        &mut self,
        state: usize,
        prefix: &str,
        out: &mut Vec<(String, Tensor)>,
        depth: usize,
    ) -> Result<()> {
        ensure!(depth <= MAX_DEPTH, "modules nested more than {MAX_DEPTH} deep");
        let u = self.u;
        let at = if prefix.is_empty() {
            "the top module".to_string()
        } else {
            format!("module {}", prefix.trim_end_matches('.'))
        };
        // `_non_persistent_buffers_set` is a pickled set(): an inert object holding its list.
        let skipped: Vec<&str> = match self.attribute(state, "_non_persistent_buffers_set").map(|id| &u.nodes[id]) {
            Some(Node::Object { args, .. }) => match u.tuple(*args).ok().map(|a| a.first().map(|&l| &u.nodes[l])) {
                Some(Some(Node::List(names))) => names.iter().filter_map(|&n| u.str(n).ok()).collect(),
                _ => Vec::new(),
            },
            _ => Vec::new(),
        };
        for field in ["_parameters", "_buffers"] {
            let Some(Node::Dict(items)) = self.attribute(state, field).map(|id| &u.nodes[id]) else { continue };
            for &(k, v) in items {
                let name = u.str(k).with_context(|| format!("{at}: a {field} name that is not a string"))?;
                match &u.nodes[v] {
                    Node::None => {} // `bias=False` leaves None in its place, and state_dict skips it
                    Node::Tensor(_) if field == "_buffers" && skipped.contains(&name) => {}
                    Node::Tensor(_) => {
                        self.spend(prefix.len() + name.len())?;
                        out.push((format!("{prefix}{name}"), self.tensor(v)?))
                    }
                    other => bail!("{at}: {field} entry {name:?} is {}, not a tensor", other.type_name()),
                }
            }
        }
        let Some(Node::Dict(children)) = self.attribute(state, "_modules").map(|id| &u.nodes[id]) else {
            return Ok(());
        };
        for &(k, v) in children {
            let name = u.str(k).with_context(|| format!("{at}: a submodule name that is not a string"))?;
            match &u.nodes[v] {
                Node::None => {}
                Node::Object { state: child, class, .. } => {
                    let child = self
                        .module_state(*child)
                        .with_context(|| format!("{at}: submodule {name:?} is a {class}, not an nn.Module"))?;
                    self.module_tensors(child, &format!("{prefix}{name}."), out, depth + 1)?
                }
                other => bail!("{at}: submodule {name:?} is {}", other.type_name()),
            }
        }
        Ok(())
    }

    /// The tensor of a view node: its storage read (once) and checked, the view copied out.
    fn tensor(&mut self, id: usize) -> Result<Tensor> {
        if let Some(t) = self.tensors.get(&id) {
            return Ok(t.shallow_clone());
        }
        let Node::Tensor(view) = &self.u.nodes[id] else {
            bail!("expected a tensor, found {}", self.u.nodes[id].type_name())
        };
        let s = &view.storage;
        if let Some(seen) = self.described.get(&s.key) {
            // Each view was checked against its own description of the storage: they must agree.
            ensure!(seen == s, "storage {} is described as both {:?} and {:?}", s.key, seen, s);
        } else {
            let bytes =
                (s.numel as u64).checked_mul(s.kind.elt_size_in_bytes() as u64).context("a storage too large")?;
            let data = read_entry(self.zip, &format!("{}/data/{}", self.prefix, s.key), bytes)?;
            let (key, got) = (&s.key, data.len());
            ensure!(got as u64 == bytes, "storage {key} holds {got} bytes, not {bytes} ({} x {:?})", s.numel, s.kind);
            self.storages.insert(&format!("storage {key}"), s.kind, &data)?;
            self.described.insert(s.key.clone(), s.clone());
        }
        let owned = self.storages.view(&format!("storage {}", s.key), &view.size, &view.stride, view.offset)?;
        self.tensors.insert(id, owned.shallow_clone());
        Ok(owned)
    }
}

/// Checks that a view of `size`, `stride` and `offset` reads only items `0..numel` of its storage
/// (`label`), so that libtorch's `as_strided` never reads outside it.
fn check_view(label: &str, numel: i64, size: &[i64], stride: &[i64], offset: i64) -> Result<()> {
    let (dims, strides) = (size.len(), stride.len());
    ensure!(dims == strides && dims <= 64, "a tensor with {dims} sizes and {strides} strides");
    ensure!(offset >= 0 && size.iter().chain(stride).all(|&x| x >= 0), "a negative size, stride or offset");
    let items = size.iter().try_fold(1i64, |n, &s| n.checked_mul(s));
    // The last element a view reads: offset + sum((size - 1) * stride).
    let last =
        size.iter().zip(stride).try_fold(offset, |end, (&n, &s)| end.checked_add((n - 1).max(0).checked_mul(s)?));
    let inside = match (items, last) {
        (Some(0), _) => offset <= numel, // an empty tensor reads nothing
        (Some(_), Some(last)) => last < numel,
        _ => false,
    };
    ensure!(
        inside,
        "a tensor of size {size:?}, stride {stride:?}, offset {offset} lies outside {label} ({numel} items)"
    );
    Ok(())
}

/// Raw tensor storages, as torch.save and torch.export store them, and checked strided views of
/// them: each view proved inside its storage before libtorch reads it, and the bytes copied out
/// bounded by the bytes stored (views may overlap, but a stride-0 view may not multiply them).
#[derive(Default)]
pub struct Storages {
    storages: HashMap<String, Tensor>,
    stored: u64,
    copied: u64,
}

impl Storages {
    /// Adds the storage named `label` (`storage 0`), little-endian items of `kind`.
    pub fn insert(&mut self, label: &str, kind: Kind, data: &[u8]) -> Result<()> {
        let size = kind.elt_size_in_bytes();
        ensure!(
            data.len().is_multiple_of(size),
            "{label} holds {} bytes, not a whole number of {kind:?} items",
            data.len()
        );
        ensure!(kind != Kind::Bool || data.iter().all(|&b| b <= 1), "{label} holds bools not 0 or 1");
        // from_data_size copies numel * element-size bytes without looking: that is data.len().
        let storage = Tensor::f_from_data_size(data, &[(data.len() / size) as i64], kind)?;
        self.storages.insert(label.to_string(), storage);
        self.stored += data.len() as u64;
        Ok(())
    }

    pub fn contains(&self, label: &str) -> bool {
        self.storages.contains_key(label)
    }

    /// `storage.as_strided(size, stride, offset)` of the storage named `label`, copied out:
    /// contiguous, and owning its memory rather than sharing the storage's.
    pub fn view(&mut self, label: &str, size: &[i64], stride: &[i64], offset: i64) -> Result<Tensor> {
        let storage = self.storages.get(label).with_context(|| format!("no {label}"))?;
        check_view(label, storage.numel() as i64, size, stride, offset)?;
        let kind = storage.kind();
        let items: i64 = size.iter().product(); // check_view proved it does not overflow
        self.copied += items as u64 * kind.elt_size_in_bytes() as u64;
        ensure!(
            self.copied <= 2 * self.stored + (1 << 20),
            "tensor views that copy far more than the {} bytes stored",
            self.stored
        );
        let strided = storage.f_as_strided(size, stride, offset)?;
        let mut owned = Tensor::f_empty(size, (kind, Device::Cpu))?;
        owned.f_copy_(&strided)?;
        Ok(owned)
    }
}

/// Writes `value` as torch.save would (a zip of a protocol-2 pickle and one record per tensor),
/// atomically, so that `torch.load(path, weights_only=True)` returns the same value: tuples
/// stay tuples, int keys stay ints, tensors keep dtype, shape and bits (stored contiguous).
pub fn write(path: &Path, value: &Value) -> Result<()> {
    // torch.save names the top folder after the file.
    let name = path.file_stem().and_then(|s| s.to_str()).filter(|s| !s.is_empty()).unwrap_or("archive");
    let bytes = to_bytes(value, name).with_context(|| format!("{}: cannot write", path.display()))?;
    crate::atomic::write(path, &bytes)
}

/// What [`write`] writes, in memory, under the top folder `name` (torch.save to a buffer
/// names it `archive`).
pub fn to_bytes(value: &Value, name: &str) -> Result<Vec<u8>> {
    let mut p = Pickler::default();
    p.out.extend([0x80, 2]); // PROTO 2, as torch.save
    p.value(value, 0)?;
    p.out.push(b'.');
    p.archive(name)
}

/// `torch.save(nn.Parameter(tensor))` to a buffer: a parameter where a plain tensor will not
/// do (torch.export's loader checks that a program's parameters are `nn.Parameter`s).
pub fn parameter_to_bytes(tensor: &Tensor) -> Result<Vec<u8>> {
    let mut p = Pickler::default();
    p.out.extend([0x80, 2]);
    p.global("torch._utils", "_rebuild_parameter");
    p.tensor(tensor)?;
    p.out.push(0x88); // requires_grad=True
    p.global("collections", "OrderedDict");
    p.out.extend(b")R\x87R."); // OrderedDict(): no backward hooks; TUPLE3, REDUCE, STOP
    p.archive("archive")
}

/// A zip as libtorch's PyTorchFileWriter writes one: every record stored uncompressed under
/// the top folder `folder`, its data on a 64-byte boundary, `.data/serialization_id` last.
pub fn zip_archive(folder: &str, mut records: Vec<(String, Vec<u8>)>) -> Result<Vec<u8>> {
    records.push((".data/serialization_id".into(), serialization_id(&records)));
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (record, data) in &records {
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .with_alignment(ALIGNMENT)
            .large_file(data.len() as u64 >= u32::MAX as u64);
        zip.start_file(format!("{folder}/{record}"), options)?;
        zip.write_all(data)?;
    }
    Ok(zip.finish()?.into_inner())
}

/// torch.save's `.data/serialization_id` is two 20-digit numbers derived from the records'
/// names and contents; ours are too (from their SHA-256), so the same value gives the same file.
fn serialization_id(records: &[(String, Vec<u8>)]) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for (name, data) in records {
        hash.update((name.len() as u64).to_le_bytes());
        hash.update(name.as_bytes());
        hash.update((data.len() as u64).to_le_bytes());
        hash.update(data);
    }
    let digest = hash.finalize();
    let half = |i: usize| u64::from_le_bytes(digest[i..i + 8].try_into().expect("8 of 32 bytes"));
    format!("{:020}{:020}", half(0), half(8)).into_bytes()
}

/// Writes a protocol-2 pickle of [`Value`]s with torch.save's tensor layout; each tensor gets
/// its own storage, whose bytes are collected for the `data/` records.
#[derive(Default)]
struct Pickler {
    out: Vec<u8>,
    /// Each global is written once and memoized (BINPUT), then fetched (BINGET), as pickle does.
    globals: HashMap<String, u32>,
    storages: Vec<Vec<u8>>,
}

impl Pickler {
    /// The pickle written so far and its storages, as torch.save lays them out.
    fn archive(self, name: &str) -> Result<Vec<u8>> {
        let mut records: Vec<(String, Vec<u8>)> = vec![
            ("data.pkl".into(), self.out),
            (".format_version".into(), b"1".to_vec()),
            (".storage_alignment".into(), ALIGNMENT.to_string().into_bytes()),
            ("byteorder".into(), b"little".to_vec()),
        ];
        records.extend(self.storages.into_iter().enumerate().map(|(key, data)| (format!("data/{key}"), data)));
        records.push(("version".into(), b"3\n".to_vec()));
        zip_archive(name, records)
    }

    fn global(&mut self, module: &str, name: &str) {
        let line = format!("{module}\n{name}\n");
        if let Some(&i) = self.globals.get(&line) {
            self.out.push(b'j'); // LONG_BINGET
            self.out.extend(i.to_le_bytes());
            return;
        }
        let i = self.globals.len() as u32;
        self.out.push(b'c'); // GLOBAL
        self.out.extend(line.as_bytes());
        self.out.push(b'r'); // LONG_BINPUT
        self.out.extend(i.to_le_bytes());
        self.globals.insert(line, i);
    }

    fn int(&mut self, i: i64) {
        match i {
            0..=0xff => self.out.extend([b'K', i as u8]),
            0x100..=0xffff => {
                self.out.push(b'M');
                self.out.extend((i as u16).to_le_bytes())
            }
            _ if i32::try_from(i).is_ok() => {
                self.out.push(b'J');
                self.out.extend((i as i32).to_le_bytes())
            }
            _ => {
                // LONG1: the fewest little-endian two's-complement bytes that keep the sign.
                let bytes = i.to_le_bytes();
                let mut n = 8;
                while n > 1
                    && ((bytes[n - 1] == 0 && bytes[n - 2] < 0x80) || (bytes[n - 1] == 0xff && bytes[n - 2] >= 0x80))
                {
                    n -= 1;
                }
                self.out.extend([0x8a, n as u8]);
                self.out.extend(&bytes[..n]);
            }
        }
    }

    fn str(&mut self, s: &str) {
        self.out.push(b'X'); // BINUNICODE
        self.out.extend((s.len() as u32).to_le_bytes());
        self.out.extend(s.as_bytes());
    }

    fn items(&mut self, items: &[Value], depth: usize) -> Result<()> {
        items.iter().try_for_each(|v| self.value(v, depth + 1))
    }

    fn value(&mut self, value: &Value, depth: usize) -> Result<()> {
        ensure!(depth <= MAX_DEPTH, "containers nested more than {MAX_DEPTH} deep, which `read` refuses");
        match value {
            Value::None => self.out.push(b'N'),
            Value::Bool(b) => self.out.push(if *b { 0x88 } else { 0x89 }),
            Value::Int(i) => self.int(*i),
            Value::Float(f) => {
                self.out.push(b'G');
                self.out.extend(f.to_be_bytes())
            }
            Value::Str(s) => {
                ensure!(s.len() <= u32::MAX as usize, "a string of {} bytes", s.len());
                self.str(s)
            }
            Value::List(items) => {
                self.out.push(b']');
                if !items.is_empty() {
                    self.out.push(b'(');
                    self.items(items, depth)?;
                    self.out.push(b'e'); // APPENDS
                }
            }
            Value::Tuple(items) => match items.len() {
                0 => self.out.push(b')'),
                n @ 1..=3 => {
                    self.items(items, depth)?;
                    self.out.push(0x84 + n as u8) // TUPLE1, TUPLE2, TUPLE3
                }
                _ => {
                    self.out.push(b'(');
                    self.items(items, depth)?;
                    self.out.push(b't')
                }
            },
            Value::Dict(items) => {
                self.out.push(b'}');
                if !items.is_empty() {
                    self.out.push(b'(');
                    for (k, v) in items {
                        ensure!(
                            matches!(k, Value::Str(_) | Value::Int(_)),
                            "a dict key that is {}: keys are strings or ints",
                            k.type_name()
                        );
                        self.value(k, depth + 1)?;
                        self.value(v, depth + 1)?;
                    }
                    self.out.push(b'u'); // SETITEMS
                }
            }
            Value::Tensor(t) => self.tensor(t)?,
        }
        Ok(())
    }

    /// `_rebuild_tensor_v2(('storage', torch.<Kind>Storage, key, 'cpu', numel), 0, size,
    /// contiguous stride, False, OrderedDict())`, as torch.save writes a CPU tensor.
    fn tensor(&mut self, t: &Tensor) -> Result<()> {
        let kind = t.f_kind()?;
        let class = STORAGES
            .iter()
            .find(|(_, k)| *k == kind)
            .with_context(|| format!("a {kind:?} tensor, which torch.save files here do not hold"))?
            .0;
        let t = t.f_detach()?.f_to_device(Device::Cpu)?.f_contiguous()?;
        let numel = t.numel();
        let mut data = vec![0u8; numel * kind.elt_size_in_bytes()];
        t.f_copy_data_u8(&mut data, numel)?;
        let key = self.storages.len();
        self.storages.push(data);
        let size = t.size();
        let mut stride = vec![1i64; size.len()];
        for d in (0..size.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * size[d + 1].max(1);
        }
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.out.extend(b"((");
        self.str("storage");
        self.global("torch", class);
        self.str(&key.to_string());
        self.str("cpu");
        self.int(numel as i64);
        self.out.extend(b"tQ"); // TUPLE, BINPERSID
        self.int(0);
        for dims in [&size, &stride] {
            self.out.push(b'(');
            dims.iter().for_each(|&d| self.int(d));
            self.out.push(b't');
        }
        self.out.push(0x89); // requires_grad=False
        self.global("collections", "OrderedDict");
        self.out.extend(b")R"); // OrderedDict(): no backward hooks
        self.out.extend(b"tR");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn s(text: &str) -> Vec<u8> {
        [&[0x8c, text.len() as u8][..], text.as_bytes()].concat() // SHORT_BINUNICODE
    }

    /// What torch.save writes (protocol 2) for `{"w": storage[offset..offset+2]}` of a
    /// 4-float storage, built by hand.
    fn state_dict_pickle(offset: u8, module: &str, name: &str) -> Vec<u8> {
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

    /// An in-memory torch.save archive of `pkl` and one storage `data/0` of 4 floats.
    fn archive(pkl: &[u8]) -> zip::ZipArchive<Cursor<Vec<u8>>> {
        let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let floats: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0].iter().flat_map(|f| f.to_le_bytes()).collect();
        for (name, data) in [("t/data.pkl", pkl), ("t/data/0", &floats)] {
            zip.start_file(name, zip::write::SimpleFileOptions::default()).unwrap();
            zip.write_all(data).unwrap();
        }
        zip::ZipArchive::new(zip.finish().unwrap()).unwrap()
    }

    fn read_pickle(pkl: &[u8], objects: Objects) -> Result<Value> {
        Ok(read_from(archive(pkl), objects)?.value)
    }

    /// The tensor views a pickle describes, without reading any storage.
    fn views(pkl: &[u8], objects: Objects) -> Result<Vec<View>> {
        let mut u = Unpickler { data: pkl, objects, ..Default::default() };
        u.run()?;
        Ok(u.nodes.into_iter().filter_map(|n| if let Node::Tensor(v) = n { Some(v) } else { None }).collect())
    }

    #[test]
    fn a_hand_built_state_dict_reads_as_its_view_of_the_storage() {
        let storage = Storage { kind: Kind::Float, key: "0".into(), numel: 4 };
        let got = views(&state_dict_pickle(2, "torch._utils", "_rebuild_tensor_v2"), Objects::Refused).unwrap();
        assert_eq!(got, [View { storage, offset: 2, size: vec![2], stride: vec![1] }]);
        let value = read_pickle(&state_dict_pickle(2, "torch._utils", "_rebuild_tensor_v2"), Objects::Refused).unwrap();
        let w = value.get("w").and_then(Value::as_tensor).unwrap();
        assert_eq!(Vec::<f32>::try_from(w).unwrap(), [3.0, 4.0]);
    }

    #[test]
    fn bad_pickles_give_the_reason() {
        let nested: Vec<u8> = [&b"\x80\x02"[..], &[b']'; MAX_DEPTH + 2], &[b'a'; MAX_DEPTH + 1], b"."].concat();
        // 40 lists, each holding the one before twice: 2^40 lists once unshared.
        let mut doubling = b"\x80\x02]q\x00".to_vec();
        for i in 1..=40u8 {
            doubling.extend([b']', b'(', b'h', i - 1, b'h', i - 1, b'e', b'q', i]);
        }
        doubling.push(b'.');
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                state_dict_pickle(3, "torch._utils", "_rebuild_tensor_v2"),
                "a tensor of size [2], stride [1], offset 3 lies outside storage 0 (4 items)",
            ),
            (
                state_dict_pickle(0, "os", "system"),
                "refuses to load os.system: only tensors, numbers, strings and containers of them",
            ),
            (b"\x80\x02}q\x00\xff".to_vec(), "unsupported pickle opcode 0xff at byte 5"),
            (b"\x80\x02}X\x00\x00\x00\x80".to_vec(), "data.pkl is truncated or damaged at byte 8"),
            (b"\x80\x02}(K\x01K\x02K\x01K\x03u.".to_vec(), "the key 1 appears twice"),
            (b"\x80\x02}()K\x01u.".to_vec(), "a dict key that is a tuple"),
            (b"\x80\x02\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01.".to_vec(), "an integer of 9 bytes"),
            (nested, "containers nested more than 256 deep"),
            (doubling, "its values would take more than 256 MiB"),
        ];
        for (pkl, expected) in cases {
            let err = format!("{:#}", read_pickle(&pkl, Objects::Refused).unwrap_err());
            assert!(err.contains(expected), "{expected:?} not in {err:?}");
        }
        for (pkl, expected) in [
            (&b"\x80\x02K\x01."[..], "holds an int, not a dict of tensors"),
            (b"\x80\x02(}t.", "holds a tuple, not a dict of tensors"),
        ] {
            let err = state_dict(read_pickle(pkl, Objects::Refused).unwrap()).unwrap_err().to_string();
            assert!(err.contains(expected), "{expected:?} not in {err:?}");
        }
    }

    #[test]
    fn objects_of_unknown_classes_are_inert_nodes_and_modules_become_state_dicts() {
        // `Net()` whose __dict__ has `_parameters = {"w": <tensor>, "b": None}`, `_modules = {}`,
        // and a `helper` attribute holding a `Helper()`: the module as torch.save(model) writes it.
        let pkl = [
            &b"\x80\x02c__main__\nNet\n)\x81}("[..],
            &s("_parameters"),
            b"}(",
            &state_dict_pickle(1, "torch._utils", "_rebuild_tensor_v2")[4..] // `"w": tensor u` without PROTO, `}(` and STOP
                [..state_dict_pickle(1, "torch._utils", "_rebuild_tensor_v2").len() - 6],
            &s("b"),
            b"Nu",
            &s("_modules"),
            b"}",
            &s("helper"),
            b"c__main__\nHelper\n)\x81ub.",
        ]
        .concat();
        let err = read_pickle(&pkl, Objects::Refused).unwrap_err().to_string();
        assert!(err.contains("refuses to load __main__.Net"), "{err}");
        let model = read_from(archive(&pkl), Objects::Inert).unwrap();
        assert_eq!(model.modules, ["__main__.Net"]);
        let sd = model.value.as_state_dict().unwrap();
        assert_eq!(sd.len(), 1);
        assert_eq!((sd[0].0, Vec::<f32>::try_from(sd[0].1).unwrap()), ("w", vec![2.0, 3.0]));
        let err = format!("{:#}", read_pickle(b"\x80\x02c__main__\nHelper\n)\x81.", Objects::Inert).unwrap_err());
        assert!(err.contains("holds a __main__.Helper object, not a state dict or an nn.Module"), "{err}");
        // Nested, another object reads as None: it is never built.
        let value = read_pickle(b"\x80\x02]c__main__\nHelper\n)\x81a.", Objects::Inert).unwrap();
        assert!(matches!(value.as_list(), Some([Value::None])));
    }

    #[test]
    fn a_torch_size_reads_as_its_tuple() {
        let value = read_pickle(b"\x80\x02ctorch\nSize\n(K\x02K\x03t\x85R.", Objects::Refused).unwrap();
        assert!(matches!(value, Value::Tuple(ref t) if matches!(t[..], [Value::Int(2), Value::Int(3)])), "{value:?}");
    }

    #[test]
    fn every_truncation_and_mutation_is_an_error_or_an_in_bounds_view_never_a_panic() {
        let good = state_dict_pickle(1, "torch._utils", "_rebuild_tensor_v2");
        for end in 0..good.len() {
            assert!(views(&good[..end], Objects::Refused).is_err(), "a pickle cut at {end} parsed");
        }
        let mut seed = 0x2545_f491_4f6c_dd1du64; // xorshift: reproducible mutations
        for round in 0..20_000 {
            let mut pkl = good.clone();
            for _ in 0..1 + seed % 4 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let at = (seed >> 8) as usize % pkl.len();
                pkl[at] = (seed >> 40) as u8;
            }
            let objects = if round % 2 == 0 { Objects::Refused } else { Objects::Inert };
            for v in views(&pkl, objects).unwrap_or_default() {
                let last: i64 = v.offset + v.size.iter().zip(&v.stride).map(|(n, s)| (n - 1).max(0) * s).sum::<i64>();
                assert!(last < v.storage.numel || v.size.contains(&0), "{v:?} escapes its storage");
            }
            if round % 100 == 0 {
                let _ = read_pickle(&pkl, objects); // the whole read, storages included
            }
        }
    }

    /// Equal values: same variants, same bits for floats, same dtype, shape and bits for tensors.
    fn same(a: &Value, b: &Value) -> bool {
        let all = |x: &[Value], y: &[Value]| x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y));
        match (a, b) {
            (Value::None, Value::None) => true,
            (Value::Bool(x), Value::Bool(y)) => x == y,
            (Value::Int(x), Value::Int(y)) => x == y,
            (Value::Float(x), Value::Float(y)) => x.to_bits() == y.to_bits(),
            (Value::Str(x), Value::Str(y)) => x == y,
            (Value::List(x), Value::List(y)) | (Value::Tuple(x), Value::Tuple(y)) => all(x, y),
            (Value::Dict(x), Value::Dict(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|((k, v), (l, w))| same(k, l) && same(v, w))
            }
            (Value::Tensor(x), Value::Tensor(y)) => {
                let bits = |t: &Tensor| {
                    let n = t.numel();
                    let mut data = vec![0u8; n * t.kind().elt_size_in_bytes()];
                    t.contiguous().copy_data_u8(&mut data, n);
                    data
                };
                x.kind() == y.kind() && x.size() == y.size() && bits(x) == bits(y)
            }
            _ => false,
        }
    }

    #[test]
    fn every_kind_of_value_round_trips_through_a_file() {
        let cpu = Device::Cpu;
        let ints = [
            0,
            1,
            255,
            256,
            65535,
            65536,
            -1,
            -256,
            i32::MIN as i64,
            i32::MAX as i64 + 1,
            -(1 << 40),
            i64::MIN,
            i64::MAX,
        ];
        let tensors = [
            Tensor::randn([2, 3], (Kind::Float, cpu)),
            Tensor::randn([4], (Kind::Double, cpu)),
            Tensor::from_slice(&[-(1i64 << 40), -1, 0, 7]),
            Tensor::from_slice(&[0u8, 7, 255]),
            Tensor::from_slice(&[true, false, true]),
            Tensor::from_slice(&[i32::MIN, 0, i32::MAX]).reshape([3, 1]),
            Tensor::from(2.5f32),                                        // 0-dim
            Tensor::arange(12, (Kind::Float, cpu)).reshape([3, 4]).tr(), // non-contiguous
            Tensor::zeros([0, 3], (Kind::Float, cpu)),                   // empty
        ];
        let value = Value::Dict(vec![
            (Value::Str("epoch".into()), Value::Int(3)),
            (Value::Str("ints".into()), Value::List(ints.iter().map(|&i| Value::Int(i)).collect())),
            (
                Value::Str("floats".into()),
                Value::Tuple(
                    [0.1, -0.0, 1e-8, f64::INFINITY, f64::NAN, f64::MIN_POSITIVE]
                        .into_iter()
                        .map(Value::Float)
                        .collect(),
                ),
            ),
            (Value::Str("flags".into()), Value::Tuple(vec![Value::Bool(true), Value::Bool(false), Value::None])),
            (Value::Str("héllo ✓".into()), Value::Str(String::new())),
            (
                Value::Int(0),
                Value::Dict(vec![
                    (Value::Int(-5), Value::Tuple(vec![])),
                    (Value::Str("0".into()), Value::List(vec![])),
                ]),
            ),
            (
                Value::Str("tuples".into()),
                Value::List((0..6).map(|n| Value::Tuple((0..n).map(Value::Int).collect())).collect()),
            ),
            (
                Value::Str("tensors".into()),
                Value::List(tensors.iter().map(|t| Value::Tensor(t.shallow_clone())).collect()),
            ),
            (Value::Str("empty".into()), Value::Dict(vec![])),
        ]);
        let dir = std::env::temp_dir().join(format!("lenet5-pickle-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("values.pt");
        write(&path, &value).unwrap();
        let back = read(&path).unwrap();
        assert!(same(&value, &back), "{value:?}\nread back as\n{back:?}");
        assert!(back
            .get("tensors")
            .and_then(Value::as_list)
            .unwrap()
            .iter()
            .all(|t| t.as_tensor().unwrap().is_contiguous()));
        // Every record starts on a 64-byte boundary, as torch.save's do.
        let mut zip = zip::ZipArchive::new(std::fs::File::open(&path).unwrap()).unwrap();
        let names: Vec<String> = zip.file_names().map(|n| n.unwrap().to_string()).collect();
        assert_eq!(
            names[..5],
            [
                "values/data.pkl",
                "values/.format_version",
                "values/.storage_alignment",
                "values/byteorder",
                "values/data/0"
            ]
        );
        assert_eq!(names[names.len() - 2..], ["values/version", "values/.data/serialization_id"]);
        for (i, name) in names.iter().enumerate() {
            assert_eq!(zip.by_index(i).unwrap().data_start().unwrap() % 64, 0, "{name}");
        }
        // The same value makes the same file.
        let again = dir.join("again").join("values.pt");
        std::fs::create_dir_all(again.parent().unwrap()).unwrap();
        write(&again, &value).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(&again).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn values_torch_save_cannot_hold_are_refused_before_anything_is_written() {
        let dir = std::env::temp_dir().join(format!("lenet5-pickle-refused-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.pt");
        let complex = Tensor::zeros([2], (Kind::ComplexFloat, Device::Cpu));
        let mut deep = Value::None;
        for _ in 0..=MAX_DEPTH + 1 {
            deep = Value::List(vec![deep]);
        }
        for (value, expected) in [
            (Value::Dict(vec![(Value::Float(1.0), Value::None)]), "a dict key that is a float"),
            (Value::Tensor(complex), "a ComplexFloat tensor"),
            (deep, "containers nested more than 256 deep"),
        ] {
            let err = format!("{:#}", write(&path, &value).unwrap_err());
            assert!(err.contains(expected) && err.contains("bad.pt"), "{expected:?} not in {err:?}");
        }
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
