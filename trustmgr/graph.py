"""Pictures of a federation: providers issue meshes' CAs, federations join meshes.

DOT and Mermaid for tools that render them; SVG drawn here, so a picture needs
nothing installed."""

from __future__ import annotations

from html import escape

from trustmgr.bundles import fingerprint
from trustmgr.federation import Federation


def _provider_of(federation: Federation, mesh: str) -> str:
    provider = federation.meshes[mesh].provider
    return provider if provider is not None else f"{mesh} (external bundle)"


def _federated_pairs(federation: Federation) -> list[tuple[str, str]]:
    names = list(federation.meshes)
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1 :] if b in federation.peers(a)]


def _shared_root_pairs(federation: Federation) -> list[tuple[str, str]]:
    names = list(federation.meshes)
    return [
        (a, b)
        for i, a in enumerate(names)
        for b in names[i + 1 :]
        if b not in federation.peers(a)
        and {fingerprint(r) for r in federation.meshes[a].roots}
        & {fingerprint(r) for r in federation.meshes[b].roots}
    ]


def to_dot(federation: Federation) -> str:
    lines = ["digraph trust {", "  rankdir=TB;", '  node [fontname="Helvetica"];']
    providers = dict.fromkeys(_provider_of(federation, m) for m in federation.meshes)
    for p in providers:
        lines.append(f'  "p:{p}" [label="{p}", shape=cylinder];')
    for name, mesh in federation.meshes.items():
        style = ", style=dashed" if mesh.external else ""
        lines.append(f'  "m:{name}" [label="{name}\\n{mesh.trust_domain}", shape=box{style}];')
        lines.append(f'  "p:{_provider_of(federation, name)}" -> "m:{name}" [label="issues"];')
    for a, b in _federated_pairs(federation):
        lines.append(
            f'  "m:{a}" -> "m:{b}" [dir=both, color="#2b7a0b", penwidth=2, label="federation"];'
        )
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_mermaid(federation: Federation) -> str:
    def ident(prefix: str, name: str) -> str:
        return prefix + "".join(c if c.isalnum() else "_" for c in name)

    lines = ["graph TD"]
    for p in dict.fromkeys(_provider_of(federation, m) for m in federation.meshes):
        lines.append(f'  {ident("p_", p)}[("{p}")]')
    for name, mesh in federation.meshes.items():
        lines.append(f'  {ident("m_", name)}["{name}<br/>{mesh.trust_domain}"]')
        lines.append(
            f"  {ident('p_', _provider_of(federation, name))} -->|issues| {ident('m_', name)}"
        )
    for a, b in _federated_pairs(federation):
        lines.append(f"  {ident('m_', a)} <==>|federation| {ident('m_', b)}")
    return "\n".join(lines) + "\n"


def to_svg(federation: Federation) -> str:
    """Providers on top, meshes below; arcs under the meshes join federated ones."""
    meshes = list(federation.meshes)
    providers = list(dict.fromkeys(_provider_of(federation, m) for m in meshes))
    box_w, box_h, gap = 170, 54, 30
    width = max(len(meshes), len(providers)) * (box_w + gap) + gap
    mesh_x = {
        m: gap + i * (box_w + gap) + (width - len(meshes) * (box_w + gap) - gap) // 2
        for i, m in enumerate(meshes)
    }
    prov_x = {
        p: gap + i * (box_w + gap) + (width - len(providers) * (box_w + gap) - gap) // 2
        for i, p in enumerate(providers)
    }
    prov_y, mesh_y = 40, 170
    pairs = _federated_pairs(federation)
    shared = _shared_root_pairs(federation)
    height = mesh_y + box_h + 40 + 28 * (len(pairs) + len(shared)) + 40
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif" font-size="13">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>',
        f'<rect width="{width}" height="{height}" fill="white"/>',
    ]
    for p, x in prov_x.items():
        out.append(
            f'<rect x="{x}" y="{prov_y}" width="{box_w}" height="{box_h}" rx="22" fill="#fff4d6" stroke="#b8860b"/>'
            f'<text x="{x + box_w / 2}" y="{prov_y + 24}" text-anchor="middle" font-weight="bold">{escape(p)}</text>'
            f'<text x="{x + box_w / 2}" y="{prov_y + 42}" text-anchor="middle" fill="#555">root</text>'
        )
    for m in meshes:
        px = prov_x[_provider_of(federation, m)] + box_w / 2
        mx = mesh_x[m] + box_w / 2
        out.append(
            f'<line x1="{px}" y1="{prov_y + box_h}" x2="{mx}" y2="{mesh_y}" stroke="#555" marker-end="url(#arrow)"/>'
        )
    for m in meshes:
        x, mesh = mesh_x[m], federation.meshes[m]
        dash = ' stroke-dasharray="6 4"' if mesh.external else ""
        out.append(
            f'<rect x="{x}" y="{mesh_y}" width="{box_w}" height="{box_h}" rx="6" fill="#e8f0fe" stroke="#1a56db"{dash}/>'
            f'<text x="{x + box_w / 2}" y="{mesh_y + 22}" text-anchor="middle" font-weight="bold">{escape(m)}</text>'
            f'<text x="{x + box_w / 2}" y="{mesh_y + 40}" text-anchor="middle" fill="#333">{escape(mesh.trust_domain)}</text>'
        )
    y = mesh_y + box_h
    for i, (a, b) in enumerate([*pairs, *shared]):
        federated = i < len(pairs)
        depth = y + 30 + 28 * i
        ax, bx = mesh_x[a] + box_w / 2, mesh_x[b] + box_w / 2
        colour = "#2b7a0b" if federated else "#999"
        dash = "" if federated else ' stroke-dasharray="5 4"'
        label = "federation" if federated else "shared root, not federated"
        out.append(
            f'<path d="M{ax},{y} V{depth} H{bx} V{y}" fill="none" stroke="{colour}" stroke-width="{2 if federated else 1.5}"{dash}/>'
            f'<text x="{(ax + bx) / 2}" y="{depth - 5}" text-anchor="middle" fill="{colour}">{label}</text>'
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"
