//! One axis of Winograd's F(2, r): the matrices B, G and A for filters of 3 or 5 taps.

/// One axis of the transform: F(2, r) for a filter of r taps, over tiles of r + 1 inputs
/// (2 outputs each), with (r − 1)/2 pixels of padding on each side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(in crate::layers::cpu) enum Taps {
    Three,
    Five,
}

impl Taps {
    pub fn of(r: usize) -> Option<Self> {
        match r {
            3 => Some(Self::Three),
            5 => Some(Self::Five),
            _ => None,
        }
    }

    pub fn len(self) -> usize {
        match self {
            Self::Three => 3,
            Self::Five => 5,
        }
    }

    /// Inputs per tile along this axis.
    pub(super) fn tile(self) -> usize {
        self.len() + 1
    }

    /// The padding that keeps the image's size.
    pub fn pad(self) -> usize {
        self.len() / 2
    }

    /// The rows of A (the columns of the output transform Aᵀ) as pairs: a tile's product ξ
    /// adds into its two outputs with these weights, so its gradient is the same combination
    /// of theirs.
    pub(super) fn spread(self) -> &'static [(f32, f32)] {
        match self {
            Self::Three => &[(1.0, 0.0), (1.0, 1.0), (1.0, -1.0), (0.0, -1.0)],
            Self::Five => &[
                (1.0, 0.0),
                (1.0, 1.0),
                (1.0, -1.0),
                (1.0, 2.0),
                (1.0, -2.0),
                (0.0, 1.0),
            ],
        }
    }

    /// G as [tile position][tap]: its column k is [`Self::filter`] of the k-th unit line.
    pub(super) fn matrix(self) -> [[f32; 5]; 6] {
        let mut g = [[0f32; 5]; 6];
        for k in 0..self.len() {
            let mut unit = [0f32; 5];
            unit[k] = 1.0;
            for (row, value) in g.iter_mut().zip(self.filter(&unit[..self.len()])) {
                row[k] = value;
            }
        }
        g
    }

    /// G g for one line of taps `g` (3 or 5 of them): the first [`Self::tile`] values.
    pub(super) fn filter(self, g: &[f32]) -> [f32; 6] {
        match self {
            // G = [1 0 0; ½ ½ ½; ½ −½ ½; 0 0 1]
            Self::Three => {
                let (a, b, c) = (g[0], g[1], g[2]);
                [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c, 0.0, 0.0]
            }
            // Points 0, 1, −1, 2, −2, ∞.
            Self::Five => {
                let [a, b, c, d, e] = [g[0], g[1], g[2], g[3], g[4]];
                let sixth = 1.0 / 6.0;
                [
                    0.25 * a,
                    -sixth * (a + b + c + d + e),
                    -sixth * (a - b + c - d + e),
                    a / 24.0 + b / 12.0 + c / 6.0 + d / 3.0 + 2.0 * e / 3.0,
                    a / 24.0 - b / 12.0 + c / 6.0 - d / 3.0 + 2.0 * e / 3.0,
                    e,
                ]
            }
        }
    }
}
