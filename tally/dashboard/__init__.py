"""Dashboards: the panels (one SQL each), the live page's assets and the Grafana dashboard generated from them."""

PAGE_PATH = "/dashboard/"  # where the worker's web port serves the live page
