//! An individual's network top to bottom, as the insets of the paper's Figure 1 draw it: each
//! vertex a box with its activation and shape, each primary edge an arrow labelled with its
//! convolution (filter, stride, channels) or "identity", skip connections as arcs on the
//! right, the fully connected layer at the bottom; parameters and FLOPs in the heading.

use population::cost::Flops;
use population::dna::{Activation, Dna, EdgeKind, ModelSpec};

use super::{si, Svg};

const WIDTH: f64 = 640.0;
const BOX_X: f64 = 40.0;
const BOX_W: f64 = 330.0;
const BOX_H: f64 = 34.0;
/// Vertical room between two boxes, for the edge's arrow and label.
const GAP: f64 = 46.0;
const TOP: f64 = 78.0;
/// Horizontal distance between two lanes of skip arcs.
const LANE: f64 = 22.0;
const SKIP: &str = "#c0392b";

/// What the heading says above the network: the individual, and what it measured.
pub struct Heading {
    pub title: String,
    pub lines: Vec<String>,
    /// Trainable scalars, as its record counted them.
    pub parameters: usize,
}

/// The SVG picture of `dna`'s network.
pub fn svg(dna: &Dna, spec: ModelSpec, heading: &Heading) -> String {
    let shapes = dna.shapes(spec.input);
    let flops = Flops::of(dna, spec);
    let n = dna.vertices.len();
    let mut svg = Svg::new();
    svg.text(
        BOX_X,
        26.0,
        17.0,
        "start",
        r#"font-weight="bold""#,
        &heading.title,
    );
    let mut info = heading.lines.clone();
    info.push(format!(
        "{} parameters, {}FLOPs per image (forward)",
        si(heading.parameters as f64),
        si(flops.forward_per_example)
    ));
    for (k, line) in info.iter().enumerate() {
        svg.text(
            BOX_X,
            46.0 + 15.0 * k as f64,
            12.5,
            "start",
            r##"fill="#333""##,
            line,
        );
    }
    let top = TOP + 15.0 * info.len().saturating_sub(2) as f64;
    let y = |i: usize| top + i as f64 * (BOX_H + GAP);
    let centre = BOX_X + BOX_W / 2.0;
    for (i, shape) in shapes.iter().enumerate() {
        let (fill, what) = if i == 0 {
            ("#e8e8e8", "input".to_string())
        } else {
            match dna.vertices[i].activation {
                Activation::BatchNormRelu => ("#d6e9f8", "batch norm + ReLU".to_string()),
                Activation::Linear => ("#ffffff", "linear".to_string()),
            }
        };
        svg.rect(BOX_X, y(i), BOX_W, BOX_H, fill);
        let label = format!(
            "{what} · {} × {} × {}",
            shape.channels, shape.height, shape.width
        );
        svg.text(centre, y(i) + 22.0, 13.0, "middle", "", &label);
        if i > 0 {
            let edge = dna.primary_edge_into(i);
            svg.arrow(centre, y(i - 1) + BOX_H, centre, y(i));
            let label = match &edge.kind {
                EdgeKind::Identity => "identity".to_string(),
                EdgeKind::Convolution(c) => {
                    let input = shapes[i - 1];
                    let (kh, kw) = (c.filter_height(), c.filter_width());
                    let reach = (kh.min(2 * input.height - 1), kw.min(2 * input.width - 1));
                    let computed = if reach != (kh, kw) {
                        format!(" (computed {}×{})", reach.0, reach.1)
                    } else {
                        String::new()
                    };
                    format!(
                        "conv {kh}×{kw}{computed}, stride {}, {} channels",
                        c.stride(),
                        c.out_channels()
                    )
                }
            };
            svg.text(
                centre + 8.0,
                y(i) - GAP / 2.0 + 4.0,
                12.0,
                "start",
                r##"fill="#222""##,
                &label,
            );
        }
    }
    // Skip arcs: each in the first lane free over its span, so that arcs never cross.
    let mut lanes: Vec<usize> = Vec::new(); // the last vertex each lane is busy up to
    let mut skips: Vec<(usize, usize)> = (1..n)
        .flat_map(|to| {
            dna.skip_edges_into(to)
                .map(move |e| (dna.vertex_index(e.from).expect("valid DNA"), to))
        })
        .collect();
    skips.sort();
    let right = BOX_X + BOX_W;
    for (from, to) in skips {
        let lane = match lanes.iter().position(|&busy| busy <= from) {
            Some(l) => {
                lanes[l] = to;
                l
            }
            None => {
                lanes.push(to);
                lanes.len() - 1
            }
        };
        let x = right + 26.0 + LANE * lane as f64;
        let (y1, y2) = (y(from) + BOX_H / 2.0, y(to) + BOX_H / 2.0);
        let d = format!(
            "M {right:.1} {y1:.1} C {x:.1} {y1:.1}, {x:.1} {y1:.1}, {x:.1} {:.1} L {x:.1} {:.1} C {x:.1} {y2:.1}, {x:.1} {y2:.1}, {:.1} {y2:.1}",
            y1 + 12.0,
            y2 - 12.0,
            right + 2.0
        );
        svg.curve(&d, SKIP);
    }
    if !lanes.is_empty() {
        let x = right + 26.0 + LANE * lanes.len() as f64;
        svg.text(
            x,
            y(0) + 22.0,
            12.0,
            "start",
            &format!(r#"fill="{SKIP}""#),
            "skip connections",
        );
    }
    let last = *shapes.last().expect("valid DNA");
    let fc = y(n);
    svg.arrow(centre, y(n - 1) + BOX_H, centre, fc);
    svg.text(
        centre + 8.0,
        fc - GAP / 2.0 + 4.0,
        12.0,
        "start",
        r##"fill="#222""##,
        &format!("flatten, {} features", last.elements()),
    );
    svg.rect(BOX_X, fc, BOX_W, BOX_H, "#fdebd0");
    svg.text(
        centre,
        fc + 22.0,
        13.0,
        "middle",
        "",
        &format!("fully connected · {} logits", spec.classes),
    );
    let width = WIDTH.max(right + 40.0 + LANE * lanes.len() as f64 + 130.0);
    svg.finish(width, fc + BOX_H + 24.0, &[SKIP])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heading() -> Heading {
        Heading {
            title: "individual x".into(),
            lines: vec!["validation 50%".into()],
            parameters: 1234,
        }
    }

    /// A box per vertex and one for the classifier, an arrow per primary edge and one into the
    /// classifier, an arc per skip, and a label per convolution.
    #[test]
    fn every_vertex_edge_and_skip_is_drawn() {
        let spec = ModelSpec::cifar(10);
        let mut seen_skip = false;
        for seed in 0..8 {
            let dna = population::fixtures::evolved_dna(seed, 40);
            let svg = svg(&dna, spec, &heading());
            let n = dna.vertices.len();
            // The background is a rect too.
            assert_eq!(svg.matches("<rect").count(), n + 2, "{}", dna.summary());
            assert_eq!(svg.matches("<line").count(), n);
            let skips = (1..n)
                .map(|i| dna.skip_edges_into(i).count())
                .sum::<usize>();
            assert_eq!(svg.matches(&format!(r#"stroke="{SKIP}""#)).count(), skips);
            seen_skip |= skips > 0;
            assert_eq!(svg.matches("conv ").count(), dna.convolutions().count());
            assert!(svg.contains("1.23 k parameters"), "{svg}");
        }
        assert!(seen_skip, "no DNA had a skip");
    }
}
