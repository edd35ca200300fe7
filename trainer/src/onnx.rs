//! An individual as an ONNX model, so that the output of evolution, "a fully-trained model",
//! runs wherever ONNX does. The graph is written from the [`Model`] itself, vertex by vertex,
//! so it computes what `Model::forward_t(images, false)` computes: batch norm from its running
//! averages, convolutions with the taps that reach the image, skips fitted by the same
//! indices. The training split's normalisation is folded in, so the input's contract is the
//! plain image: `images`, float32 `[batch, channels, height, width]`, RGB, each value a pixel
//! byte divided by 255. The output is `logits`, float32 `[batch, classes]` (no softmax, which
//! does not change the predicted class).

use candle_core::{DType, Tensor};
use candle_onnx::onnx;
use prost::Message;

use crate::data::Normalization;
use crate::layers::BATCH_NORM_EPS;
use crate::model::{EdgeOp, Model};

/// Opset 17 (ONNX 1.12, 2022) is read by every maintained runtime; nothing newer is needed.
pub const OPSET: i64 = 17;
/// The IR version that goes with opset 17.
const IR_VERSION: i64 = 8;
pub const INPUT: &str = "images";
pub const OUTPUT: &str = "logits";

#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("reading the model's tensors for export: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("the normalisation has {got} channels, the model's input {expected}")]
    Channels { got: usize, expected: usize },
}

/// What the exported file says about itself (`metadata_props`), beside the graph.
#[derive(Clone, Debug, Default)]
pub struct Metadata {
    pub entries: Vec<(String, String)>,
}

impl Metadata {
    pub fn with(mut self, key: &str, value: impl ToString) -> Self {
        self.entries.push((key.to_string(), value.to_string()));
        self
    }
}

/// The ONNX file (protobuf bytes) of `model`, which was trained on images normalised by
/// `normalization`.
pub fn export(
    model: &Model,
    normalization: &Normalization,
    metadata: &Metadata,
) -> Result<Vec<u8>, OnnxError> {
    Ok(graph(model, normalization, metadata)?.encode_to_vec())
}

/// The model as an ONNX message, for callers that inspect it before writing it.
pub fn graph(
    model: &Model,
    normalization: &Normalization,
    metadata: &Metadata,
) -> Result<onnx::ModelProto, OnnxError> {
    let shapes = model.shapes();
    let input = shapes[0];
    if input.channels != normalization.mean.len() {
        return Err(OnnxError::Channels {
            got: normalization.mean.len(),
            expected: input.channels,
        });
    }
    let mut g = Builder::default();
    let stats = [1, input.channels, 1, 1];
    let mean = g.floats("normalization.mean", &stats, &normalization.mean);
    let std = g.floats("normalization.std", &stats, &normalization.std);
    let centred = g.node("Sub", &[INPUT, &mean], "images.centred", vec![]);
    let normalised = g.node("Div", &[&centred, &std], "v0", vec![]);
    // values[i]: the name of vertex i's output (vertex 0: the normalised images).
    let mut values = vec![normalised];
    for (k, op) in model.vertex_ops().iter().enumerate() {
        let index = k + 1;
        let from = values[op.from].clone();
        let mut v = match &op.edge {
            EdgeOp::Identity => from,
            EdgeOp::Convolution(conv) => {
                let weight = conv.weight().as_tensor();
                let (_, _, fh, fw) = weight.dims4()?;
                // The rule of `Conv2d::forward`: taps further than (side - 1) from the centre
                // only meet padding, so the model computes with the centre alone.
                let source = shapes[op.from];
                let (kh, kw) = (fh.min(2 * source.height - 1), fw.min(2 * source.width - 1));
                let weight = weight
                    .narrow(2, (fh - kh) / 2, kh)?
                    .narrow(3, (fw - kw) / 2, kw)?;
                let prefix = format!("v{index}.conv");
                let w = g.tensor(&format!("{prefix}.weight"), &weight)?;
                let b = g.tensor(&format!("{prefix}.bias"), conv.bias().as_tensor())?;
                let (ph, pw) = (((kh - 1) / 2) as i64, ((kw - 1) / 2) as i64);
                let stride = conv.stride() as i64;
                g.node(
                    "Conv",
                    &[&from, &w, &b],
                    &prefix,
                    vec![
                        ints("kernel_shape", &[kh as i64, kw as i64]),
                        ints("pads", &[ph, pw, ph, pw]),
                        ints("strides", &[stride, stride]),
                    ],
                )
            }
        };
        for (s, (source, resize)) in op.skips.iter().enumerate() {
            let prefix = format!("v{index}.skip{s}");
            let mut x = values[*source].clone();
            // Rows (axis 2), then columns (axis 3), where the sizes differ.
            for (axis, name, index) in [(2, "rows", resize.rows()), (3, "cols", resize.cols())] {
                if let Some(index) = index {
                    let idx = g.indices(&format!("{prefix}.{name}"), index);
                    let out = format!("{prefix}.{name}.fit");
                    x = g.node("Gather", &[&x, &idx], &out, vec![int("axis", axis)]);
                }
            }
            let (from_c, to_c) = resize.channels();
            if to_c < from_c {
                let starts = g.int64s(&format!("{prefix}.starts"), &[0]);
                let ends = g.int64s(&format!("{prefix}.ends"), &[to_c as i64]);
                let axes = g.int64s(&format!("{prefix}.axes"), &[1]);
                x = g.node(
                    "Slice",
                    &[&x, &starts, &ends, &axes],
                    &format!("{prefix}.c"),
                    vec![],
                );
            } else if to_c > from_c {
                let extra = (to_c - from_c) as i64;
                let pads = g.int64s(&format!("{prefix}.pads"), &[0, 0, 0, 0, 0, extra, 0, 0]);
                x = g.node("Pad", &[&x, &pads], &format!("{prefix}.c"), vec![]);
            }
            v = g.node("Add", &[&v, &x], &format!("{prefix}.sum"), vec![]);
        }
        if let Some(bn) = &op.batch_norm {
            let prefix = format!("v{index}.bn");
            let names = [
                g.tensor(&format!("{prefix}.gamma"), bn.gamma().as_tensor())?,
                g.tensor(&format!("{prefix}.beta"), bn.beta().as_tensor())?,
                g.tensor(&format!("{prefix}.mean"), bn.running_mean().as_tensor())?,
                g.tensor(&format!("{prefix}.var"), bn.running_var().as_tensor())?,
            ];
            let normed = g.node(
                "BatchNormalization",
                &[&v, &names[0], &names[1], &names[2], &names[3]],
                &prefix,
                vec![float("epsilon", BATCH_NORM_EPS as f32)],
            );
            v = g.node("Relu", &[&normed], &format!("v{index}.relu"), vec![]);
        }
        values.push(v);
    }
    let last = values.last().expect("the input at least");
    let flat = g.node("Flatten", &[last], "flat", vec![int("axis", 1)]);
    let classifier = model.classifier();
    let w = g.tensor("classifier.weight", classifier.weight().as_tensor())?;
    let b = g.tensor("classifier.bias", classifier.bias().as_tensor())?;
    let classes = classifier.weight().as_tensor().dims()[0];
    g.node_named("Gemm", &[&flat, &w, &b], OUTPUT, vec![int("transB", 1)]);

    let batch = || dim_param("batch");
    let graph = onnx::GraphProto {
        name: "cambrian".into(),
        node: g.nodes,
        initializer: g.initializers,
        input: vec![value_info(
            INPUT,
            vec![
                batch(),
                dim(input.channels),
                dim(input.height),
                dim(input.width),
            ],
        )],
        output: vec![value_info(OUTPUT, vec![batch(), dim(classes)])],
        doc_string: format!(
            "An image classifier evolved by cambrian. Input `{INPUT}`: float32 [batch, \
             {}, {}, {}], RGB, each value a pixel byte divided by 255 (the training split's \
             normalisation is inside the model). Output `{OUTPUT}`: float32 [batch, \
             {classes}], one logit per class; the largest is the prediction.",
            input.channels, input.height, input.width
        ),
        ..Default::default()
    };
    let join = |v: &[f32]| {
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut metadata_props = vec![
        entry("input", "RGB pixel / 255, NCHW"),
        entry("normalization.mean", &join(&normalization.mean)),
        entry("normalization.std", &join(&normalization.std)),
    ];
    metadata_props.extend(metadata.entries.iter().map(|(k, v)| entry(k, v)));
    Ok(onnx::ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![onnx::OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        producer_name: "cambrian".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        doc_string: graph.doc_string.clone(),
        graph: Some(graph),
        metadata_props,
        ..Default::default()
    })
}

/// Nodes and initialisers in the order they are made; every node's inputs exist before it,
/// so the list is already the topological order ONNX requires.
#[derive(Default)]
struct Builder {
    nodes: Vec<onnx::NodeProto>,
    initializers: Vec<onnx::TensorProto>,
}

impl Builder {
    /// A node whose output is named `{name}.out`; returns that name.
    fn node(
        &mut self,
        op: &str,
        inputs: &[&str],
        name: &str,
        attribute: Vec<onnx::AttributeProto>,
    ) -> String {
        self.node_named(op, inputs, &format!("{name}.out"), attribute)
    }

    fn node_named(
        &mut self,
        op: &str,
        inputs: &[&str],
        output: &str,
        attribute: Vec<onnx::AttributeProto>,
    ) -> String {
        self.nodes.push(onnx::NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.to_string()],
            name: output.trim_end_matches(".out").to_string(),
            op_type: op.into(),
            attribute,
            ..Default::default()
        });
        output.to_string()
    }

    fn initializer(&mut self, name: &str, dims: &[usize], data_type: i32, raw: Vec<u8>) -> String {
        self.initializers.push(onnx::TensorProto {
            name: name.into(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type,
            raw_data: raw,
            ..Default::default()
        });
        name.to_string()
    }

    fn floats(&mut self, name: &str, dims: &[usize], values: &[f32]) -> String {
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializer(name, dims, onnx::tensor_proto::DataType::Float as i32, raw)
    }

    fn int64s(&mut self, name: &str, values: &[i64]) -> String {
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let dims = [values.len()];
        self.initializer(name, &dims, onnx::tensor_proto::DataType::Int64 as i32, raw)
    }

    fn indices(&mut self, name: &str, values: &[usize]) -> String {
        let values: Vec<i64> = values.iter().map(|&v| v as i64).collect();
        self.int64s(name, &values)
    }

    fn tensor(&mut self, name: &str, t: &Tensor) -> Result<String, OnnxError> {
        let dims = t.dims().to_vec();
        let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(self.floats(name, &dims, &values))
    }
}

fn attribute(name: &str, kind: onnx::attribute_proto::AttributeType) -> onnx::AttributeProto {
    onnx::AttributeProto {
        name: name.into(),
        r#type: kind as i32,
        ..Default::default()
    }
}

fn int(name: &str, i: i64) -> onnx::AttributeProto {
    onnx::AttributeProto {
        i,
        ..attribute(name, onnx::attribute_proto::AttributeType::Int)
    }
}

fn ints(name: &str, ints: &[i64]) -> onnx::AttributeProto {
    onnx::AttributeProto {
        ints: ints.to_vec(),
        ..attribute(name, onnx::attribute_proto::AttributeType::Ints)
    }
}

fn float(name: &str, f: f32) -> onnx::AttributeProto {
    onnx::AttributeProto {
        f,
        ..attribute(name, onnx::attribute_proto::AttributeType::Float)
    }
}

fn entry(key: &str, value: &str) -> onnx::StringStringEntryProto {
    onnx::StringStringEntryProto {
        key: key.into(),
        value: value.into(),
    }
}

fn dim(size: usize) -> onnx::tensor_shape_proto::Dimension {
    onnx::tensor_shape_proto::Dimension {
        value: Some(onnx::tensor_shape_proto::dimension::Value::DimValue(
            size as i64,
        )),
        ..Default::default()
    }
}

fn dim_param(name: &str) -> onnx::tensor_shape_proto::Dimension {
    onnx::tensor_shape_proto::Dimension {
        value: Some(onnx::tensor_shape_proto::dimension::Value::DimParam(
            name.into(),
        )),
        ..Default::default()
    }
}

fn value_info(name: &str, dims: Vec<onnx::tensor_shape_proto::Dimension>) -> onnx::ValueInfoProto {
    onnx::ValueInfoProto {
        name: name.into(),
        r#type: Some(onnx::TypeProto {
            value: Some(onnx::type_proto::Value::TensorType(
                onnx::type_proto::Tensor {
                    elem_type: onnx::tensor_proto::DataType::Float as i32,
                    shape: Some(onnx::TensorShapeProto { dim: dims }),
                },
            )),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};

    use candle_core::Device;
    use population::dna::{Dna, ModelSpec};

    use super::*;

    fn normalization() -> Normalization {
        Normalization {
            mean: [0.49, 0.48, 0.45],
            std: [0.25, 0.24, 0.26],
        }
    }

    /// A model of `dna` whose batch-norm statistics have moved off their initial values.
    fn model(dna: &Dna, seed: u64) -> Model {
        let model = Model::fresh(dna, ModelSpec::cifar(10), seed, &Device::Cpu).unwrap();
        for s in 0..2 {
            let x = Tensor::randn(0.3f32, 1., (6, 3, 32, 32), &Device::Cpu).unwrap();
            let x = x.affine(1.0, s as f64 * 0.1).unwrap();
            model.forward_t(&x, true).unwrap();
        }
        model
    }

    /// What the model computes from `images` in [0, 1], normalised as in training.
    fn reference(model: &Model, images: &Tensor) -> Tensor {
        let n = normalization();
        let mean = Tensor::new(&n.mean, &Device::Cpu)
            .unwrap()
            .reshape((1, 3, 1, 1));
        let std = Tensor::new(&n.std, &Device::Cpu)
            .unwrap()
            .reshape((1, 3, 1, 1));
        let x = images
            .broadcast_sub(&mean.unwrap())
            .unwrap()
            .broadcast_div(&std.unwrap())
            .unwrap();
        model.forward_t(&x, false).unwrap()
    }

    /// Evolved DNAs of every kind (convolutions of every stride and filter size, skips that
    /// resize, pad and truncate, linear and batch-norm vertices) evaluate in candle-onnx's own
    /// ONNX interpreter to the model's logits: a check of the graph, independent of how the
    /// file is encoded. The test that an independent runtime agrees is `tests/tests/onnx.rs`.
    #[test]
    fn exported_graphs_compute_the_models_logits() {
        let mut ops = BTreeSet::new();
        for seed in 0..6 {
            let dna = population::fixtures::evolved_dna(seed, 40);
            let model = model(&dna, seed);
            let proto = graph(&model, &normalization(), &Metadata::default()).unwrap();
            for node in &proto.graph.as_ref().unwrap().node {
                ops.insert(node.op_type.clone());
            }
            let images = Tensor::rand(0f32, 1., (3, 3, 32, 32), &Device::Cpu).unwrap();
            let expected = reference(&model, &images);
            let bytes = proto.encode_to_vec();
            let decoded = onnx::ModelProto::decode(bytes.as_slice()).unwrap();
            let inputs = HashMap::from([(INPUT.to_string(), images)]);
            let outputs = candle_onnx::simple_eval(&decoded, inputs).unwrap();
            let logits = &outputs[OUTPUT];
            assert_eq!(logits.dims(), &[3, 10]);
            let diff = crate::layers::cpu::max_diff(logits, &expected);
            assert!(diff < 1e-4, "seed {seed}: {diff} for {}", dna.summary());
        }
        for op in [
            "Conv",
            "BatchNormalization",
            "Relu",
            "Gemm",
            "Add",
            "Gather",
        ] {
            assert!(ops.contains(op), "no DNA exercised {op}: {ops:?}");
        }
    }

    #[test]
    fn the_file_declares_its_contract() {
        let model = model(&Dna::initial(), 0);
        let meta = Metadata::default().with("individual", "abc");
        let proto = graph(&model, &normalization(), &meta).unwrap();
        assert_eq!(proto.opset_import[0].version, OPSET);
        let graph = proto.graph.unwrap();
        let input = &graph.input[0];
        assert_eq!(input.name, INPUT);
        let Some(onnx::type_proto::Value::TensorType(t)) =
            input.r#type.as_ref().unwrap().value.as_ref()
        else {
            panic!("a tensor input")
        };
        let dims = &t.shape.as_ref().unwrap().dim;
        assert!(matches!(
            dims[0].value,
            Some(onnx::tensor_shape_proto::dimension::Value::DimParam(_))
        ));
        let keys: Vec<_> = proto
            .metadata_props
            .iter()
            .map(|e| e.key.as_str())
            .collect();
        assert!(keys.contains(&"normalization.mean") && keys.contains(&"individual"));
        // The initial DNA: normalisation, then the classifier on the flattened image.
        let ops: Vec<_> = graph.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["Sub", "Div", "Flatten", "Gemm"]);
    }
}
