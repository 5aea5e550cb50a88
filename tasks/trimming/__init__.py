"""Expert trimming components: expert / layer / block drop scores, surgery and config."""
