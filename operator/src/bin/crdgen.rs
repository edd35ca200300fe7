//! Prints the EvolutionExperiment CRD as YAML; `charts/evolution-operator/crds/` holds its
//! output, and a test fails when the two differ.

fn main() {
    print!("{}", operator::crd_yaml());
}
