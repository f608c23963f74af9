//! The sync prefix hash index (see DESIGN.md, "The index").
