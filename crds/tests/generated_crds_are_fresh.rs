//! The CRD manifests committed in the chart must be exactly what `crdgen`
//! renders from the types; otherwise users would install a schema the code
//! does not match.

use twinvol_crds::generate;

#[test]
fn committed_crd_yaml_matches_the_types() {
    let dir = generate::chart_crd_dir();
    let stale = generate::stale_files(&dir).expect("reading the chart's crds/ directory");
    assert!(
        stale.is_empty(),
        "these committed CRD manifests differ from what the code generates: {stale:?}\n\
         regenerate them with `{}` and commit the result",
        generate::REGENERATE
    );
}
