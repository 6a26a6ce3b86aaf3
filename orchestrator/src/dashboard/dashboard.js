// The dashboard's script (placeholder).
