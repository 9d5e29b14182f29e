/* tractoscale report viewer: niivue (loaded beside this page) shows the display copies that
   data scripts hand over with tractoscaleViewer.add(key, items); works from file:// (no fetch). */
window.tractoscaleViewer = (function () {
  "use strict";
  const loaded = {}, waiting = {};
  function bytes(b64) {
    const s = atob(b64), u = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) u[i] = s.charCodeAt(i);
    return u.buffer;
  }
  function add(key, items) {
    loaded[key] = items;
    (waiting[key] || []).forEach(function (f) { f(items); });
    delete waiting[key];
  }
  function fetchData(key, src) {
    if (loaded[key]) return Promise.resolve(loaded[key]);
    return new Promise(function (resolve, reject) {
      (waiting[key] = waiting[key] || []).push(resolve);
      const s = document.createElement("script");
      s.src = src;
      s.onerror = function () { reject(new Error("cannot load " + src)); };
      document.head.appendChild(s);
    });
  }
  function setState(el, state, text) {
    el.dataset.state = state;
    const st = el.parentNode.querySelector(".viewer-status");
    if (st && text) st.textContent = text;
  }
  async function show(el, key, src) {
    if (typeof niivue === "undefined") {
      setState(el, "unavailable", "The 3D view needs niivue, which was not installed when this report was written.");
      return;
    }
    try {
      setState(el, "loading", "loading " + key + " ...");
      if (!el.nv) {
        el.nv = new niivue.Niivue({ backColor: [0, 0, 0, 1], show3Dcrosshair: false, isColorbar: false,
                                    loadingText: "" });
        await el.nv.attachToCanvas(el.querySelector("canvas"));
      }
      const nv = el.nv;
      while (nv.meshes.length) nv.removeMesh(nv.meshes[0]);
      while (nv.volumes.length) nv.removeVolume(nv.volumes[0]);
      const items = await fetchData(key, src);
      for (const it of items) {
        await nv.loadFromArrayBuffer(bytes(it.data), it.name);
        if (it.kind === "mesh") {
          const mesh = nv.meshes[nv.meshes.length - 1];
          if (it.groupColors && mesh.groups) {   /* {group name: [r, g, b]} -> niivue's group colormap */
            const cm = { R: [], G: [], B: [], I: [] };
            mesh.groups.forEach(function (g, i) {
              const c = it.groupColors[g.id];
              if (c) { cm.R.push(c[0]); cm.G.push(c[1]); cm.B.push(c[2]); cm.I.push(i); }
            });
            nv.setMeshProperty(mesh.id, "fiberGroupColormap", cm);
          }
          nv.setMeshProperty(mesh.id, "fiberRadius", it.radius || 0);
        }
      }
      if (nv.volumes.length) {
        /* FA slices with the streamlines, and a 3D tile cut by a clip plane */
        nv.setSliceType(nv.sliceTypeMultiplanar);
        nv.opts.multiplanarShowRender = niivue.SHOW_RENDER.ALWAYS;
        nv.opts.multiplanarLayout = niivue.MULTIPLANAR_TYPE.GRID;
        nv.opts.crosshairColor = [1, 1, 1, 0.4];
        nv.opts.crosshairWidth = 0.25;   /* in voxels */
        nv.setClipPlane([0.0, 180, 20]);
      } else {
        nv.setSliceType(nv.sliceTypeRender);
      }
      nv.setRenderAzimuthElevation(110, 15);
      nv.drawScene();
      setState(el, "ready", el.dataset.caption || ("showing " + key));
    } catch (err) {
      setState(el, "error", "3D view failed: " + err);
      throw err;
    }
  }
  function init() {
    document.querySelectorAll(".viewer").forEach(function (el) {
      const select = el.parentNode.querySelector("select.viewer-choice");
      if (select) {
        select.addEventListener("change", function () {
          const o = select.options[select.selectedIndex];
          show(el, o.value, o.dataset.src);
        });
        const o = select.options[select.selectedIndex];
        show(el, o.value, o.dataset.src);
      } else {
        show(el, el.dataset.key, el.dataset.src);
      }
    });
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init); else init();
  return { add: add, show: show };
})();
