"""Reports (`tally report …`): plain builders of a Report from query results, and one renderer for every format."""
