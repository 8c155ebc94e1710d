//! Just enough of ONNX's protobuf to run a graph: the model's opsets and
//! metadata, and the graph's nodes, attributes, initializers, inputs and
//! outputs. A plain wire-format reader over the file's bytes (no protoc, no
//! generated code); anything it does not need is skipped.
//!
//! Owns: decoding only. Knows nothing of candle or of what ops mean.

use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    Float(f32),
    Int(i64),
    Bytes(Vec<u8>),
    Floats(Vec<f32>),
    Ints(Vec<i64>),
    Tensor(TensorProto),
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeProto {
    pub op_type: String,
    pub name: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attributes: HashMap<String, AttrValue>,
}

/// ONNX element types this reader keeps.
pub const FLOAT: i32 = 1;
pub const INT32: i32 = 6;
pub const INT64: i32 = 7;
pub const FLOAT16: i32 = 10;
pub const DOUBLE: i32 = 11;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct TensorProto {
    pub name: String,
    pub dims: Vec<i64>,
    pub data_type: i32,
    /// Little-endian element bytes (from `raw_data`, or packed from the typed fields).
    pub raw: Vec<u8>,
    /// True when the data lives in an external file (not supported).
    pub external: bool,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ValueInfo {
    pub name: String,
    /// Dimensions; -1 where symbolic or unknown.
    pub dims: Vec<i64>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct GraphProto {
    pub nodes: Vec<NodeProto>,
    pub initializers: Vec<TensorProto>,
    pub inputs: Vec<ValueInfo>,
    pub outputs: Vec<ValueInfo>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelProto {
    pub graph: GraphProto,
    /// (domain, version); "" is the default domain.
    pub opsets: Vec<(String, i64)>,
    pub metadata: HashMap<String, String>,
}

type R<T> = Result<T, String>;

/// One field of a message: its number and its payload.
enum Field<'a> {
    Varint(u64),
    /// Skipped: nothing this reader keeps is a fixed64.
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

struct Reader<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8]) -> Self {
        Reader { b, i: 0 }
    }

    fn varint(&mut self) -> R<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.b.get(self.i).ok_or("truncated varint")?;
            self.i += 1;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }

    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        let end = self
            .i
            .checked_add(n)
            .filter(|e| *e <= self.b.len())
            .ok_or("truncated field")?;
        let s = &self.b[self.i..end];
        self.i = end;
        Ok(s)
    }

    fn next(&mut self) -> R<Option<(u32, Field<'a>)>> {
        if self.i >= self.b.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let (num, wire) = ((key >> 3) as u32, key & 7);
        let f = match wire {
            0 => Field::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Field::Fixed64
            }
            2 => {
                let n = self.varint()? as usize;
                Field::Bytes(self.take(n)?)
            }
            5 => Field::Fixed32(u32::from_le_bytes(self.take(4)?.try_into().map_err(|_| "bad fixed32")?)),
            w => return Err(format!("unsupported protobuf wire type {w}")),
        };
        Ok(Some((num, f)))
    }
}

fn string(f: Field<'_>) -> R<String> {
    match f {
        Field::Bytes(b) => String::from_utf8(b.to_vec()).map_err(|_| "string is not UTF-8".into()),
        _ => Err("expected a string".into()),
    }
}

fn bytes<'a>(f: Field<'a>) -> R<&'a [u8]> {
    match f {
        Field::Bytes(b) => Ok(b),
        _ => Err("expected a length-delimited field".into()),
    }
}

fn int(f: Field<'_>) -> R<i64> {
    match f {
        Field::Varint(v) => Ok(v as i64),
        _ => Err("expected a varint".into()),
    }
}

/// Repeated int64: packed or one per field.
fn ints(f: Field<'_>, out: &mut Vec<i64>) -> R<()> {
    match f {
        Field::Varint(v) => out.push(v as i64),
        Field::Bytes(b) => {
            let mut r = Reader::new(b);
            while r.i < b.len() {
                out.push(r.varint()? as i64);
            }
        }
        _ => return Err("expected int64 values".into()),
    }
    Ok(())
}

/// Repeated float: packed or one per field.
fn floats(f: Field<'_>, out: &mut Vec<f32>) -> R<()> {
    match f {
        Field::Fixed32(v) => out.push(f32::from_bits(v)),
        Field::Bytes(b) => out.extend(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        _ => return Err("expected float values".into()),
    }
    Ok(())
}

pub fn parse_model(b: &[u8]) -> R<ModelProto> {
    let mut m = ModelProto::default();
    let mut r = Reader::new(b);
    let mut saw_graph = false;
    while let Some((num, f)) = r.next()? {
        match num {
            7 => {
                m.graph = parse_graph(bytes(f)?)?;
                saw_graph = true;
            }
            8 => {
                let mut r = Reader::new(bytes(f)?);
                let (mut domain, mut version) = (String::new(), 0);
                while let Some((n, f)) = r.next()? {
                    match n {
                        1 => domain = string(f)?,
                        2 => version = int(f)?,
                        _ => {}
                    }
                }
                m.opsets.push((domain, version));
            }
            14 => {
                let mut r = Reader::new(bytes(f)?);
                let (mut k, mut v) = (String::new(), String::new());
                while let Some((n, f)) = r.next()? {
                    match n {
                        1 => k = string(f)?,
                        2 => v = string(f)?,
                        _ => {}
                    }
                }
                m.metadata.insert(k, v);
            }
            _ => {}
        }
    }
    if !saw_graph {
        return Err("no graph: not an ONNX model".into());
    }
    Ok(m)
}

fn parse_graph(b: &[u8]) -> R<GraphProto> {
    let mut g = GraphProto::default();
    let mut r = Reader::new(b);
    while let Some((num, f)) = r.next()? {
        match num {
            1 => g.nodes.push(parse_node(bytes(f)?)?),
            5 => g.initializers.push(parse_tensor(bytes(f)?)?),
            11 => g.inputs.push(parse_value_info(bytes(f)?)?),
            12 => g.outputs.push(parse_value_info(bytes(f)?)?),
            _ => {}
        }
    }
    Ok(g)
}

fn parse_node(b: &[u8]) -> R<NodeProto> {
    let mut n = NodeProto::default();
    let mut r = Reader::new(b);
    while let Some((num, f)) = r.next()? {
        match num {
            1 => n.inputs.push(string(f)?),
            2 => n.outputs.push(string(f)?),
            3 => n.name = string(f)?,
            4 => n.op_type = string(f)?,
            5 => {
                let (name, v) = parse_attribute(bytes(f)?)?;
                if let Some(v) = v {
                    n.attributes.insert(name, v);
                }
            }
            _ => {}
        }
    }
    Ok(n)
}

fn parse_attribute(b: &[u8]) -> R<(String, Option<AttrValue>)> {
    let mut name = String::new();
    let (mut fl, mut i, mut s, mut t) = (None, None, None, None);
    let (mut fs, mut is) = (Vec::new(), Vec::new());
    let mut ty = 0;
    let mut r = Reader::new(b);
    while let Some((num, f)) = r.next()? {
        match num {
            1 => name = string(f)?,
            2 => {
                if let Field::Fixed32(v) = f {
                    fl = Some(f32::from_bits(v))
                }
            }
            3 => i = Some(int(f)?),
            4 => s = Some(bytes(f)?.to_vec()),
            5 => t = Some(parse_tensor(bytes(f)?)?),
            7 => floats(f, &mut fs)?,
            8 => ints(f, &mut is)?,
            20 => ty = int(f)?,
            _ => {}
        }
    }
    // AttributeType: FLOAT 1, INT 2, STRING 3, TENSOR 4, FLOATS 6, INTS 7.
    let v = match ty {
        1 => fl.map(AttrValue::Float),
        2 => i.map(AttrValue::Int),
        3 => s.map(AttrValue::Bytes),
        4 => t.map(AttrValue::Tensor),
        6 => Some(AttrValue::Floats(fs)),
        7 => Some(AttrValue::Ints(is)),
        _ => None,
    };
    Ok((name, v))
}

fn parse_tensor(b: &[u8]) -> R<TensorProto> {
    let mut t = TensorProto::default();
    let (mut fs, mut i64s, mut i32s) = (Vec::new(), Vec::new(), Vec::new());
    let mut r = Reader::new(b);
    while let Some((num, f)) = r.next()? {
        match num {
            1 => ints(f, &mut t.dims)?,
            2 => t.data_type = int(f)? as i32,
            4 => floats(f, &mut fs)?,
            5 => ints(f, &mut i32s)?,
            7 => ints(f, &mut i64s)?,
            8 => t.name = string(f)?,
            9 => t.raw = bytes(f)?.to_vec(),
            14 => t.external = int(f)? == 1,
            _ => {}
        }
    }
    if t.raw.is_empty() {
        t.raw = match t.data_type {
            FLOAT => fs.iter().flat_map(|v| v.to_le_bytes()).collect(),
            INT64 => i64s.iter().flat_map(|v| v.to_le_bytes()).collect(),
            INT32 => i32s.iter().flat_map(|v| (*v as i32).to_le_bytes()).collect(),
            _ => Vec::new(),
        };
    }
    Ok(t)
}

fn parse_value_info(b: &[u8]) -> R<ValueInfo> {
    let mut v = ValueInfo::default();
    let mut r = Reader::new(b);
    while let Some((num, f)) = r.next()? {
        match num {
            1 => v.name = string(f)?,
            2 => {
                // TypeProto.tensor_type(1).shape(2).dim(1).{dim_value(1) | dim_param(2)}
                let mut tr = Reader::new(bytes(f)?);
                while let Some((n, f)) = tr.next()? {
                    if n != 1 {
                        continue;
                    }
                    let mut tt = Reader::new(bytes(f)?);
                    while let Some((n, f)) = tt.next()? {
                        if n != 2 {
                            continue;
                        }
                        let mut sh = Reader::new(bytes(f)?);
                        while let Some((n, f)) = sh.next()? {
                            if n != 1 {
                                continue;
                            }
                            let mut dim = -1;
                            let mut d = Reader::new(bytes(f)?);
                            while let Some((n, f)) = d.next()? {
                                if n == 1 {
                                    dim = int(f)?;
                                }
                            }
                            v.dims.push(dim);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Ok(v)
}

// Parameters of graph ops; only the graph evaluator reads them.
#[cfg_attr(not(feature = "candle-graph"), allow(dead_code))]
impl TensorProto {
    /// The values as i64 (for shape-like parameters).
    pub fn to_i64s(&self) -> R<Vec<i64>> {
        match self.data_type {
            INT64 => Ok(self
                .raw
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect()),
            INT32 => Ok(self
                .raw
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect()),
            t => Err(format!(
                "tensor `{}`: expected integers, found element type {t}",
                self.name
            )),
        }
    }

    /// The dimensions, checked: none negative, no product of them (hence no
    /// stride) overflowing, and their product is the element count that
    /// `elem_bytes`-wide elements give the data.
    pub fn shape(&self, elem_bytes: usize) -> R<Vec<usize>> {
        let bad = |why: &str| format!("tensor `{}`: dims {:?} {why}", self.name, self.dims);
        let dims = self
            .dims
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| bad("include a negative size")))
            .collect::<R<Vec<usize>>>()?;
        // Strides are products of the trailing dims, so those must fit too:
        // `[0, 2^40, 2^40]` holds no elements but its first stride overflows.
        dims.iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d.max(1)))
            .ok_or_else(|| bad("overflow"))?;
        let count = dims.iter().product::<usize>();
        if count.checked_mul(elem_bytes) != Some(self.raw.len()) {
            return Err(bad(&format!(
                "need {count} elements, but the data holds {} bytes",
                self.raw.len()
            )));
        }
        Ok(dims)
    }

    /// The values as f32 (for float parameters such as Resize scales).
    pub fn to_f32s(&self) -> R<Vec<f32>> {
        match self.data_type {
            FLOAT => Ok(self
                .raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()),
            t => Err(format!(
                "tensor `{}`: expected float32, found element type {t}",
                self.name
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }
    fn field(num: u32, payload: &[u8], out: &mut Vec<u8>) {
        varint(((num as u64) << 3) | 2, out);
        varint(payload.len() as u64, out);
        out.extend_from_slice(payload);
    }

    #[test]
    fn an_empty_tensor_whose_strides_overflow_is_refused() {
        let t = |dims: Vec<i64>| TensorProto {
            name: "w".into(),
            dims,
            data_type: FLOAT,
            ..TensorProto::default()
        };
        // No elements, yet the stride of the leading 0 is 2^40 * 2^40.
        let err = t(vec![0, 1 << 40, 1 << 40]).shape(4).unwrap_err();
        assert!(err.contains("overflow"), "{err}");
        assert_eq!(t(vec![0, 3, 4]).shape(4), Ok(vec![0, 3, 4]));
    }

    #[test]
    fn decodes_a_hand_built_model() {
        let mut tensor = Vec::new();
        field(1, &[2, 3], &mut tensor); // packed dims [2, 3]
        varint(2 << 3, &mut tensor);
        varint(FLOAT as u64, &mut tensor);
        field(8, b"w", &mut tensor);
        field(9, &[0u8; 24], &mut tensor);
        let mut attr = Vec::new();
        field(1, b"perm", &mut attr);
        field(8, &[0, 2, 1], &mut attr);
        varint(20 << 3, &mut attr);
        varint(7, &mut attr);
        let mut node = Vec::new();
        field(1, b"x", &mut node);
        field(2, b"y", &mut node);
        field(4, b"Transpose", &mut node);
        field(5, &attr, &mut node);
        let mut graph = Vec::new();
        field(1, &node, &mut graph);
        field(5, &tensor, &mut graph);
        let mut model = Vec::new();
        varint(1 << 3, &mut model);
        varint(8, &mut model);
        field(7, &graph, &mut model);
        let mut opset = Vec::new();
        varint(2 << 3, &mut opset);
        varint(19, &mut opset);
        field(8, &opset, &mut model);

        let m = parse_model(&model).unwrap();
        assert_eq!(m.opsets, [(String::new(), 19)]);
        let n = &m.graph.nodes[0];
        assert_eq!(
            (n.op_type.as_str(), n.inputs.as_slice(), n.outputs.as_slice()),
            ("Transpose", &["x".to_owned()][..], &["y".to_owned()][..])
        );
        assert_eq!(n.attributes["perm"], AttrValue::Ints(vec![0, 2, 1]));
        let t = &m.graph.initializers[0];
        assert_eq!(
            (t.name.as_str(), t.dims.as_slice(), t.raw.len()),
            ("w", &[2, 3][..], 24)
        );
        assert!(parse_model(&[0x0a, 0x05, 1]).is_err(), "truncated");
        assert!(parse_model(b"\xff\xd8\xff\xe0").is_err(), "a JPEG is not ONNX");
    }
}
