//! Pictures of one individual for people: its network as the paper's Figure 1 insets draw it
//! ([`architecture`]) and the chain of ancestors evolution made it from ([`lineage`]). Plain
//! SVG written by hand: boxes, arrows and text, which every browser and image viewer opens.

pub mod architecture;
pub mod lineage;

use std::fmt::Write as _;

/// An SVG document being drawn, in pixels, with the styles both pictures share.
pub(crate) struct Svg {
    body: String,
}

pub(crate) const FONT: &str = "DejaVu Sans, Helvetica, Arial, sans-serif";

impl Svg {
    pub(crate) fn new() -> Self {
        Self {
            body: String::new(),
        }
    }

    pub(crate) fn rect(&mut self, x: f64, y: f64, w: f64, h: f64, fill: &str) {
        let _ = writeln!(
            self.body,
            r##"<rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{h:.1}" rx="6" fill="{fill}" stroke="#444" stroke-width="1.2"/>"##
        );
    }

    /// Text anchored at `anchor` (`start`, `middle` or `end`) with its baseline at `y`.
    pub(crate) fn text(
        &mut self,
        x: f64,
        y: f64,
        size: f64,
        anchor: &str,
        style: &str,
        text: &str,
    ) {
        let _ = writeln!(
            self.body,
            r##"<text x="{x:.1}" y="{y:.1}" font-size="{size}" text-anchor="{anchor}" {style}>{}</text>"##,
            escape(text)
        );
    }

    /// A straight arrow from (x1, y1) to (x2, y2).
    pub(crate) fn arrow(&mut self, x1: f64, y1: f64, x2: f64, y2: f64) {
        let _ = writeln!(
            self.body,
            r##"<line x1="{x1:.1}" y1="{y1:.1}" x2="{x2:.1}" y2="{y2:.1}" stroke="#444" stroke-width="1.4" marker-end="url(#arrow)"/>"##
        );
    }

    /// A path (SVG path data), drawn as an arrow in `colour`.
    pub(crate) fn curve(&mut self, d: &str, colour: &str) {
        let _ = writeln!(
            self.body,
            r##"<path d="{d}" fill="none" stroke="{colour}" stroke-width="1.4" marker-end="url(#arrow-{})"/>"##,
            colour.trim_start_matches('#')
        );
    }

    /// The document, `width` × `height` pixels on a white background, with arrowheads in
    /// the colours `curves` use.
    pub(crate) fn finish(self, width: f64, height: f64, curve_colours: &[&str]) -> String {
        let mut markers = String::from(
            r##"<marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#444"/></marker>"##,
        );
        for c in curve_colours {
            let _ = write!(
                markers,
                r##"<marker id="arrow-{}" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="{c}"/></marker>"##,
                c.trim_start_matches('#')
            );
        }
        format!(
            r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="{FONT}">
<defs>{markers}</defs>
<rect width="100%" height="100%" fill="white"/>
{}</svg>
"##,
            self.body
        )
    }
}

/// `text` safe inside an SVG element.
pub(crate) fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A count as people read it: 1234567 → "1.23 M".
pub(crate) fn si(value: f64) -> String {
    let (scaled, unit) = if value >= 1e12 {
        (value / 1e12, " T")
    } else if value >= 1e9 {
        (value / 1e9, " G")
    } else if value >= 1e6 {
        (value / 1e6, " M")
    } else if value >= 1e3 {
        (value / 1e3, " k")
    } else {
        (value, "")
    };
    // Three significant digits: 485 k, 61.6 k, 1.23 M.
    let digits = if scaled >= 100.0 {
        0
    } else if scaled >= 10.0 {
        1
    } else {
        2
    };
    let text = format!("{scaled:.digits$}");
    let text = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.')
    } else {
        &text
    };
    format!("{text}{unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_counts_read_well() {
        assert_eq!(escape("a<b & \"c\">"), "a&lt;b &amp; &quot;c&quot;&gt;");
        assert_eq!(si(1_234_567.0), "1.23 M");
        assert_eq!(si(30_730.0), "30.7 k");
        assert_eq!(si(485_386.0), "485 k");
        assert_eq!(si(2_000_000.0), "2 M");
        assert_eq!(si(12.0), "12");
    }
}
