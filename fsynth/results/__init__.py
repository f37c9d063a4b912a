"""The results page's pure side: rows of final runs, their aggregation over seeds, ablations, rendering, figures."""
